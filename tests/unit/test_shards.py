"""The packed token shard format: round trip and truncation."""

import numpy as np
import pytest

from kompakt.errors import DataError
from kompakt.shards import ShardWriter, TokenShards, write_index


def _write(folder, vocab):
    w = ShardWriter(folder, 0, vocab)
    w.add_document([([5, 6, 7], [1, 0, 1]), ([8], [1])])
    w.add_document([])
    w.add_document([([vocab - 1, 3], [1, 1])])
    write_index(folder, [w.close()], vocab)


@pytest.mark.parametrize("vocab,dtype", [(30_000, np.uint16), (70_000, np.uint32)])
def test_round_trip(tmp_path, vocab, dtype):
    _write(tmp_path, vocab)
    s = TokenShards(tmp_path)
    assert s.dtype == dtype and s.num_docs == 2 and s.num_tokens == 6
    toks, ws, sents = s.document(0)
    assert toks.tolist() == [5, 6, 7, 8] and ws.tolist() == [1, 0, 1, 1] and sents.tolist() == [0, 3, 4]
    toks, _, sents = s.document(1)
    assert toks.tolist() == [vocab - 1, 3] and sents.tolist() == [0, 2]


def test_truncated_shard_is_clear_error(tmp_path):
    _write(tmp_path, 1000)
    p = tmp_path / "00000.tokens"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenShards(tmp_path)
