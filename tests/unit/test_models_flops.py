"""Model FLOPs against a hand count for tiny configs."""

from kompakt.model_config import ModelConfig
from kompakt.models.flops import flops_per_token, model_flops


def test_bert_hand_count():
    # D=8, F=16, 2 layers, V=64; sequences of 3 and 5 tokens (T=8), 2 predictions.
    cfg = ModelConfig(family="bert", vocab_size=64, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16)
    body = 512 + 3 * 8 * 8                           # layer 1: 4 D^2 + 2 D F = 512; layer 2: q, k, v = 192
    last = 8 * 8 + 2 * 8 * 16                        # layer 2 past attention, on the 2 predicted rows: 320
    attention = 12 * 8 * 2 * (3 * 3 + 5 * 5)         # 12 D U sum(l^2) = 6528
    head = 8 * 8 + 8 * 64                            # 576 per prediction
    expected = 6 * body * 8 + 6 * last * 2 + attention + 6 * head * 2
    assert model_flops(cfg, [3, 5], 2) == expected == 33792 + 3840 + 6528 + 6912
    assert flops_per_token(cfg, [3, 5], 2) == expected / 8


def test_albert_counts_shared_layers_per_use():
    # 4 layer uses of 2 inner layers each in 2 groups: params of 4 layers, FLOPs of 8 layer uses.
    cfg = ModelConfig(family="albert", vocab_size=64, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=16,
                      embedding_size=4, num_hidden_groups=2, inner_group_num=2)
    body = 7 * 512 + 3 * 64 + 4 * 8                  # 7 full uses, the last one's q/k/v, projection E D
    last = 64 + 2 * 8 * 16                           # on 1 prediction + 1 [CLS] row
    attention = 12 * 8 * 8 * 16                      # one sequence of 4: sum l^2 = 16
    head = 8 * 4 + 4 * 64                            # D->E, E->V
    per_seq = 8 * 8 + 2 * 8                          # pooler + SOP
    assert model_flops(cfg, [4], 1) == 6 * body * 4 + 6 * last * 2 + attention + 6 * head + 6 * per_seq


def test_spanbert_adds_sbo_head_and_packing_lowers_attention():
    kw = dict(vocab_size=64, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    bert, span = ModelConfig(family="bert", **kw), ModelConfig(family="spanbert", **kw)
    last = 8 * 8 + 2 * 8 * 16                        # SpanBERT's last layer also runs on the 2 boundary rows
    assert model_flops(span, [4], 1) - model_flops(bert, [4], 1) == 6 * (4 * 8 * 8 + 8 * 64) + 6 * last * 2
    assert model_flops(bert, [4, 4], 0) < model_flops(bert, [8], 0)


def test_modernbert_flops_count_the_local_window_band():
    import torch

    from kompakt.model_config import ModelConfig
    from kompakt.models.flops import model_flops, window_pairs

    for lens, w in (([1, 3, 5, 6, 40], 2), ([128, 512, 7], 64)):
        brute = sum(sum(1 for i in range(n) for j in range(n) if abs(i - j) <= w) for n in lens)
        assert window_pairs(torch.tensor(lens), w) == brute
    cfg = dict(family="modernbert", vocab_size=1024, hidden_size=64, num_layers=6, num_heads=2,
               intermediate_size=96, max_position_embeddings=1024)
    local = ModelConfig(**cfg, modernbert={"local_attention": 16, "global_attn_every_n_layers": 3})
    wide = ModelConfig(**cfg, modernbert={"local_attention": 2048, "global_attn_every_n_layers": 3})
    lens, m = [512, 300], 120
    # 4 of 6 layers local: their attention term shrinks from l^2 to the band, the rest is the same.
    d = model_flops(wide, lens, m) - model_flops(local, lens, m)
    expected = 12 * 64 * 4 * (sum(n * n for n in lens) - window_pairs(torch.tensor(lens), 8))
    assert abs(d - expected) < 1e-6 * d
