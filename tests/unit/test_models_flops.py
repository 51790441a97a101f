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
