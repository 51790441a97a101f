"""Lattice-BERT (Chinese) end to end through the CLI: prepare (zh) -> tokenizer (characters + jieba
lexicon) -> pretrain (MSP) -> export, and the export loads with stock `transformers.AutoModel` once
kompakt is imported (no remote code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kompakt.cli import main
from kompakt.runs import read_manifest
from kompakt.shards import TokenShards

REPO = Path(__file__).resolve().parents[2]

# Short everyday documents of 2-4 sentences, written for this test; the words are in jieba's dictionary.
DOCS = [
    "今天天气很好，我们一起去公园散步吧。公园里有很多人在跑步。",
    "我每天早上七点起床，然后吃早饭。早饭通常是牛奶和面包。",
    "妈妈在厨房里做饭，爸爸在客厅看电视。我在房间里写作业。",
    "这家饭店的菜非常好吃！我们下次还要再来。服务员也很热情。",
    "明天下午我要去图书馆借书。你想和我一起去吗？",
    "北京是中国的首都，有很多历史悠久的名胜古迹。每年都有大量游客来这里旅游。",
    "我的朋友喜欢打篮球，他每个周末都去体育馆练习。他的技术越来越好了。",
    "学校明天开始放假，学生们都很高兴。老师提醒大家注意安全。",
    "最近工作很忙，我经常加班到很晚。希望下个月能休息几天。",
    "小狗在院子里跑来跑去，看起来非常开心。孩子们也跟着它一起玩。",
    "这本小说的故事很感人，我一口气就看完了。作者的文笔非常优美。",
    "春天来了，花园里的花都开了。空气中弥漫着淡淡的花香。",
    "他正在学习中文，每天都练习写汉字。他说中文虽然很难，但是很有意思。",
    "超市里的水果很新鲜，价格也不贵。我买了苹果、香蕉和葡萄。",
    "昨天晚上下了一场大雨，街道上到处都是积水。今天早上交通很拥堵。",
    "我的手机没电了，你能借我充电器吗？我要给家里打个电话。",
    "这个城市的地铁非常方便，可以到达很多地方。上下班的时候人特别多。",
    "姐姐下个月就要结婚了，全家人都在忙着准备婚礼。大家都为她感到高兴。",
    "医生说我需要多喝水，多休息。我决定以后每天早点睡觉。",
    "我们公司今年招聘了很多新员工。他们都很年轻，也很有活力。",
    "周末我喜欢在家里看电影，有时候也会出去爬山。爬山可以锻炼身体。",
    "这次考试我考得不太好，心里有点难过。老师鼓励我继续努力。",
    "奶奶今年八十岁了，身体还很健康。她每天早上都去公园打太极拳。",
    "飞机晚点了两个小时，乘客们只好在机场等待。有人在看书，有人在睡觉。",
    "我们班上个星期举行了一次足球比赛。最后我们赢了！",
    "他是一位很有经验的工程师，参加过很多重要的项目。同事们都很尊重他。",
    "冬天的北方非常寒冷，经常下雪。孩子们喜欢在雪地里堆雪人。",
    "这家咖啡店环境安静，很适合看书和工作。我常常在这里待一个下午。",
    "妹妹想学弹钢琴，妈妈给她找了一位老师。她每个星期上两次课。",
    "为了保护环境，我们应该少用塑料袋。出门购物的时候最好自己带包。",
    "今天是我的生日，朋友们给我准备了一个大蛋糕。我感到非常幸福！",
    "火车站离我家不远，走路只要十分钟。我经常坐火车去上海。",
    "这台电脑已经用了五年，速度越来越慢了。我打算买一台新的。",
    "他每天坚持跑步，已经坚持了三年。现在他的身体比以前好多了。",
    "我们在海边度过了一个愉快的假期。每天都能看到美丽的日出。",
    "这个问题很复杂，我们需要认真讨论一下。大家有什么好的建议吗？",
    "商店门口排着长队，大家都在等着买新出的手机。有人从早上就开始排队了。",
    "哥哥在大学里学习计算机专业。他毕业以后想当一名软件工程师。",
    "中秋节的时候，一家人坐在一起吃月饼、看月亮。这是中国的传统节日。",
    "图书馆里非常安静，大家都在认真看书。我找到了一本关于历史的书。",
    "这条河的水很清，可以看见河里的小鱼。夏天很多人来这里游泳。",
    "我的房间不大，但是很干净。窗户外面有一棵很高的树。",
    "经理让我明天上午把报告交给他。我今天晚上得把它写完。",
    "这个菜有点辣，你能吃辣的吗？如果不能，我们可以换一个。",
    "去年夏天我去了云南旅游，那里的风景非常美。我拍了很多照片。",
    "孩子们在教室里唱歌跳舞，准备参加学校的文艺演出。家长们也来观看了。",
    "天气预报说明天会降温，出门要多穿点衣服。小心不要感冒了。",
    "我们邻居家养了一只小猫，它特别喜欢晒太阳。每天中午它都躺在窗台上。",
    "爷爷年轻的时候是一名老师，教了三十多年的书。很多学生现在还来看望他。",
    "这座大桥是去年建成的，大大方便了两岸居民的出行。晚上桥上的灯光很漂亮。",
    "我最喜欢的季节是秋天，天气凉爽，树叶变黄。秋天也是收获的季节。",
    "她在一家银行工作，每天都要处理很多业务。虽然很累，但是她很喜欢这份工作。",
    "电影院今天晚上有一部新电影上映。我们买了两张票，七点开始。",
    "这个村子不大，只有几十户人家。村里的人都很友好。",
    "我正在准备明年的研究生考试，每天都在图书馆复习。希望能考上理想的学校。",
    "他的汉语说得非常流利，听不出来是外国人。他在中国已经生活了十年。",
    "早上的阳光照进房间，让人感到很温暖。我打开窗户，呼吸新鲜的空气。",
    "我们计划下个月去杭州看西湖。听说那里的春天特别美丽。",
    "这家医院的医生和护士都很负责。病人们对他们的服务非常满意。",
    "下班以后我去菜市场买了一些蔬菜和鸡蛋。晚上我要给家人做一顿好吃的。",
    "小明的作文写得很好，老师在班上表扬了他。他决定以后要当一名作家。",
    "现在很多人喜欢在网上购物，既方便又便宜。快递一般两三天就能送到。",
    "公司的会议定在星期三上午十点。请大家提前准备好材料。",
    "山上的空气很好，风景也很美。我们在山顶休息了一会儿，然后下山了。",
    "我的自行车坏了，只好走路去学校。路上我遇到了同学，我们一起走。",
    "这个星期天是母亲节，我想给妈妈买一束鲜花。她一定会很高兴的！",
    "这里的冬天不太冷，很少下雪。很多老人喜欢来这里过冬。",
    "他对音乐很感兴趣，会弹吉他，也会唱歌。他希望将来能成立自己的乐队。",
    "新年快到了，街上到处都挂着红灯笼。人们忙着买年货，准备过年。",
    "我们学校的食堂饭菜很便宜，味道也不错。中午的时候食堂里人很多。",
    "朋友送给我一本书，书里讲的是一个人环游世界的故事。我非常喜欢这本书。",
    "这个公园晚上八点关门，我们得快点走了。明天我们再来玩吧。",
    "他每天晚上都会给父母打电话，问问他们的身体情况。他是一个孝顺的孩子。",
    "研究表明，适当的运动对健康很有好处。每天散步半个小时就很有效果。",
    "我们需要更多的志愿者来帮助组织这次活动。有兴趣的同学可以报名参加。",
    "这座城市有很多博物馆，每个周末都有不少家长带孩子去参观。孩子们在那里学到了很多知识。",
    "外面风很大，记得关好窗户。今天晚上可能还会下雨。",
    "我刚搬到这个城市，还不太熟悉这里的环境。邻居们都很热心地帮助我。",
    "这道数学题太难了，我想了很久也没想出来。最后还是请老师给我讲了一遍。",
    "每年春节，很多在外地工作的人都会回家和家人团聚。火车票总是很难买。",
]


def _recipe(tmp_path: Path) -> Path:
    """recipes/lattice-base-zh.yaml shrunk to a tiny model, a few steps and this test's corpus."""
    src = tmp_path / "zh.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
                           for i, t in enumerate(DOCS)), encoding="utf-8")
    recipe = yaml.safe_load((REPO / "recipes" / "lattice-base-zh.yaml").read_text(encoding="utf-8"))
    recipe["name"] = "lattice-test"
    recipe["run_dir"] = str(tmp_path / "runs")
    # Documents here are 2-4 short sentences (25-60 characters), not the recipe's 50+.
    recipe["data"].update(inputs=[str(src)], min_chars=10, num_proc=1, num_shards=1)
    recipe["tokenizer"].update(vocab_size=640, lexicon_size=2000, min_frequency=1, heldout_fraction=0.05, num_proc=1)
    recipe["model"].update(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                           max_position_embeddings=128)
    recipe["model"]["lattice"].update(max_word_len=4, max_relative_distance=16)
    pre = recipe["pretrain"]
    pre.update(max_steps=12, save_every=12, keep_last=1, log_every=4, eval_every=12, eval_batches=1,
               precision="fp32", compile=False, time_limit_minutes=10)
    pre["objective"].update(max_seq_len=64)
    pre["data"].update(tokens_per_micro_batch=512, global_batch_tokens=512, prefetch=0, num_workers=1)
    pre["optim"].update(name="adamw", lr=2e-3)
    pre["schedule"].update(warmup_steps=2)
    # Compression of a Lattice-BERT teacher: layer dropping by contribution (scored on packed lattice rows) and
    # torch int8 of the result.
    recipe["compress"] = {"teacher": "pretrain", "heldout_examples": 16, "measure_speed": False, "students": [
        {"name": "drop", "method": "layer_drop", "strategy": "contribution", "num_drop": 1},
        {"name": "drop-int8", "method": "quantize", "source": "drop", "backend": "torch"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def test_lattice_pipeline_end_to_end(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    assert main(["run", str(recipe)]) == 0
    # The logged masked sample shows lattice words by their text, not as None.
    err = capfd.readouterr().err
    sample = err.split("first masked sample:")[1].splitlines()[1]
    # kompakt run ends with fill-mask on held-out characters through the lattice (covering words left out).
    assert "held-out words: model top-1" in err and "the unigram guess" in err, err[-2000:]
    assert "None" not in sample and any(len(t) > 1 and "[" not in t for t in sample.split()), sample
    runs = tmp_path / "runs"
    [prep] = sorted(runs.glob("prepare-*"))
    [tok] = sorted(runs.glob("tokenizer-*"))
    [pre] = sorted(runs.glob("pretrain-*"))
    [comp] = sorted(runs.glob("compress-*"))
    for d in (prep, tok, pre, comp):
        assert read_manifest(d)["complete"] is True, d

    # prepare keeps (almost) every short Chinese document: langid and the length filters fit Chinese.
    rows = [r for f in sorted((prep / "corpus").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) >= 0.9 * len(DOCS)
    assert {r["lang"] for r in rows} == {"zh"}

    # tokenizer: characters plus jieba words spelt with them; the shards hold every document.
    tok_manifest = read_manifest(tok)
    lexicon = [line.split("\t")[0] for line in (tok / "tokenizer" / "lexicon.txt").read_text("utf-8").splitlines()]
    assert tok_manifest["counts"]["num_lexicon_words"] == len(lexicon) > 100
    assert {"公园", "图书馆", "天气"} <= set(lexicon)
    shards, held = TokenShards(tok / "tokens"), TokenShards(tok / "heldout")
    assert shards.num_docs == tok_manifest["counts"]["num_docs"] and held.num_docs >= 1
    assert shards.num_docs + held.num_docs == len(rows)
    assert shards.num_tokens + held.num_tokens >= sum(len(r["text"]) for r in rows) * 0.9

    # pretrain: finite losses, MSP logged, the lexicon sized the word table.
    pre_manifest = read_manifest(pre)
    assert pre_manifest["counts"]["steps"] == 12
    assert pre_manifest["config"]["model"]["lattice"]["num_words"] == len(lexicon)
    metrics = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in metrics if "loss" in r]
    assert train_rows and all(math.isfinite(r["loss"]) for r in train_rows)
    assert any("loss_msp" in r for r in metrics), metrics[-1]
    assert all(math.isfinite(r["loss_msp"]) for r in metrics if "loss_msp" in r)
    assert all(math.isfinite(v) for v in pre_manifest["final_losses"].values())

    # export: stock AutoModel once kompakt is imported, no remote code; a padded batch gives finite states.
    import kompakt

    kompakt.register_hf()  # model_type lattice-bert
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from kompakt.pretrain.lattice import Lexicon, read_lexicon, build_lattice

    export = pre / "export"
    assert (export / "lexicon.txt").is_file()
    model = AutoModel.from_pretrained(export).eval()
    hf_tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    vocab = hf_tok.get_vocab()
    lex = Lexicon.from_words(read_lexicon(export / "lexicon.txt"), vocab, first_word_id=model.config.vocab_size,
                             max_word_len=4)
    texts = ["我们一起去公园散步。", "今天天气很好，图书馆里非常安静。"]
    lattices = [build_lattice([[vocab[c] for c in t]], lex, cls_id=vocab["[CLS]"], sep_id=vocab["[SEP]"])
                for t in texts]
    assert all(len(lat) > lat.num_chars for lat in lattices)  # words were matched
    width = max(len(lat) for lat in lattices)

    def pad(name):
        return torch.tensor([list(getattr(lat, name)) + [0] * (width - len(lat)) for lat in lattices])

    mask = torch.tensor([[1] * len(lat) + [0] * (width - len(lat)) for lat in lattices])
    with torch.no_grad():
        out = model(input_ids=pad("input_ids"), attention_mask=mask, lattice_start=pad("lattice_start"),
                    lattice_end=pad("lattice_end"), token_type_ids=pad("token_type_ids"))
    hidden = out.last_hidden_state
    assert hidden.shape == (2, width, model.config.hidden_size) and torch.isfinite(hidden).all()

    # compress: the dropped student is a Lattice-BERT folder of one layer with the lexicon beside it, the same
    # outputs as the teacher's first layer alone; int8 agrees with it on held-out text.
    students = read_manifest(comp)["students"]
    drop_dir = comp / "students" / "drop"
    assert students["drop"]["figures"]["kept_layers"] in ([0], [1])
    assert (drop_dir / "lexicon.txt").is_file() and (comp / "students" / "drop-int8" / "lexicon.txt").is_file()
    dropped = AutoModel.from_pretrained(drop_dir).eval()
    assert dropped.config.num_hidden_layers == 1 and len(dropped.lattice.encoder.layer) == 1
    by_hand = AutoModel.from_pretrained(export).eval()
    kept = students["drop"]["figures"]["kept_layers"][0]
    by_hand.lattice.encoder.layer = torch.nn.ModuleList([by_hand.lattice.encoder.layer[kept]])
    inputs = dict(input_ids=pad("input_ids"), attention_mask=mask, lattice_start=pad("lattice_start"),
                  lattice_end=pad("lattice_end"), token_type_ids=pad("token_type_ids"))
    with torch.no_grad():
        torch.testing.assert_close(dropped(**inputs).last_hidden_state, by_hand(**inputs).last_hidden_state)
    agree = students["drop-int8"]["figures"]["agreement"]
    assert agree["argmax_agreement"] >= 0.9, agree
