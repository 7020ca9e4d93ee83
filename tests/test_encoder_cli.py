"""``pyfff export | fill-mask | embed | info`` (in process, through ``pyfff.__main__.main``)."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

import pyfff
from encoder_helpers import TINY
from pyfff.__main__ import main

MLM = os.path.join(TINY, "mlm")


@pytest.mark.parametrize("command", ["export", "fill-mask", "embed", "info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"pyfff {command}" in out


def test_export_then_info(tmp_path, capsys):
    assert main(["export", MLM, str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["architecture"] == "crammedBERT" and info["summary"]["layers"] == 2
    assert info["config"]["ffn_depth"] == 3


def test_export_into_non_empty_folder_is_a_user_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    assert main(["export", MLM, str(tmp_path / "x")]) == 2
    assert "error: " in capsys.readouterr().err


def test_fill_mask_json_matches_api(capsys):
    text = "the quick <mask> fox"
    assert main(["fill-mask", MLM, text, "-k", "3", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = pyfff.load(MLM).fill_mask(text, top_k=3)
    assert [[d["token"] for d in preds] for preds in out] == [[t for t, _ in preds] for preds in want]
    np.testing.assert_allclose([d["probability"] for d in out[0]], [p for _, p in want[0]], rtol=1e-6)


def test_fill_mask_errors(capsys):
    assert main(["fill-mask", MLM, "no mask here"]) == 2
    assert "no <mask> token" in capsys.readouterr().err
    assert main(["fill-mask", "/no/such/folder", "<mask>"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_embed_file_to_npy(tmp_path, capsys):
    texts = ["first line", "a second, longer line of text", "third"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert main(["embed", MLM, str(tmp_path / "in.txt"), "-o", str(tmp_path / "e.npy"), "-b", "2"]) == 0
    emb = np.load(tmp_path / "e.npy")
    np.testing.assert_allclose(emb, pyfff.load(MLM).embed(texts), rtol=1e-5, atol=1e-6)


def test_embed_stdin_prints_rows(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert main(["embed", MLM, "-"]) == 0
    rows = np.loadtxt(io.StringIO(capsys.readouterr().out))
    assert rows.shape == (2, 64)


def test_embed_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["embed", MLM, str(tmp_path / "empty.txt")]) == 2
    assert "no lines" in capsys.readouterr().err


def test_export_file_permissions_follow_umask(tmp_path):
    """An export is readable like the user's other new files (0666 less the umask), not private (0600)."""
    old = os.umask(0o022)
    try:
        assert main(["export", MLM, str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o644, name


def test_export_non_empty_message_names_the_cli_flag(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    assert main(["export", MLM, str(tmp_path / "x")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_to_a_read_only_place_is_one_line(tmp_path, capsys):
    """An OSError (here: a read-only destination) is a user error: one line on stderr, exit status 2."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):                                # root ignores permissions: use a path under a file
            target = str(tmp_path / "a_file" / "out")
            (tmp_path / "a_file").write_text("x")
        else:
            target = str(ro / "out")
        assert main(["export", MLM, target]) == 2
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err
    assert err.startswith("pyfff export: error: ") and err.count("\n") == 1 and "Traceback" not in err
