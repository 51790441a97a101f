"""Input fingerprints of folders (a `datasets.save_to_disk` folder, say): content, not location."""

import os
import shutil

from kompakt.runs import file_fingerprint


def _folder(root, files):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"state.json": b'{"a": 1}', "data-00000-of-00002.arrow": b"x" * 1000,
         "sub/data-00001.arrow": b"y" * 10}


def test_folder_hash_is_its_content_not_its_place_or_write_order(tmp_path):
    a = _folder(tmp_path / "a", FILES)
    b = _folder(tmp_path / "elsewhere" / "b", dict(reversed(list(FILES.items()))))
    assert file_fingerprint(a) == file_fingerprint(b)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    os.utime(c / "state.json", (0, 0))
    assert file_fingerprint(c) == file_fingerprint(a)


def test_folder_hash_changes_with_a_byte_a_name_or_a_new_file(tmp_path):
    ref = file_fingerprint(_folder(tmp_path / "ref", FILES))
    changed = _folder(tmp_path / "byte", {**FILES, "sub/data-00001.arrow": b"y" * 9 + b"z"})
    renamed = _folder(tmp_path / "name", {("sub/renamed.arrow" if k.startswith("sub/") else k): v
                                          for k, v in FILES.items()})
    moved = _folder(tmp_path / "moved", {("data-00001.arrow" if k.startswith("sub/") else k): v
                                         for k, v in FILES.items()})
    extra = _folder(tmp_path / "extra", {**FILES, "README.md": b""})
    hashes = [file_fingerprint(d) for d in (changed, renamed, moved, extra)]
    assert ref not in hashes and len(set(hashes)) == len(hashes)


def test_files_keep_their_hash_and_folders_use_the_same_large_file_rule(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(b"hello")
    # The file rule is unchanged, so existing stage hashes stay valid.
    assert file_fingerprint(f) == "8301aa2a9c3a5268fcf1f7711d757e8d"
    big = _folder(tmp_path / "big", {"a.arrow": b"h" * 100 + b"m" * 100 + b"t" * 100})
    same_ends = _folder(tmp_path / "same_ends", {"a.arrow": b"h" * 100 + b"M" * 100 + b"t" * 100})
    # Above full_limit only the size, head and tail count (chunk bytes each).
    small_limit = dict(full_limit=200, chunk=100)
    assert file_fingerprint(big, **small_limit) == file_fingerprint(same_ends, **small_limit)
    assert file_fingerprint(big) != file_fingerprint(same_ends)


def test_symlinked_subfolder_is_hashed_once_and_a_loop_ends(tmp_path):
    d = _folder(tmp_path / "d", FILES)
    (d / "loop").symlink_to(d, target_is_directory=True)
    assert len(file_fingerprint(d)) == 32
