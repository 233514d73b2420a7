"""A model directory an operator got wrong: one line `clv: error: ...` naming the file and what is
wrong, exit 2, no traceback, from every command that loads a model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from export_onnx import ArtifactError
from export_onnx.runtime import META_FILE, MODEL_FILE, Artifact, shipped_model_dir
from harness import CLV


def broken(tmp: Path, case: str) -> Path:
    """A copy of the shipped model broken one way."""
    out = tmp / case
    if case == "empty":
        out.mkdir()
        return out
    shutil.copytree(shipped_model_dir(), out)
    meta = json.loads((out / META_FILE).read_text())
    if case == "truncated":
        graph = (out / MODEL_FILE).read_bytes()
        (out / MODEL_FILE).write_bytes(graph[:len(graph) // 3])
    elif case == "not_json":
        (out / META_FILE).write_text('{"version": "gru-1", "window": ')
    elif case == "other_format":
        (out / META_FILE).write_text(json.dumps({**meta, "format": 2}))
    elif case == "not_its_graph":
        (out / META_FILE).write_text(json.dumps({**meta, "hidden": meta["hidden"] * 2}))
    elif case == "no_scaler":
        (out / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "scaler"}))
    return out


CASES = {  # case: (the file named, what is said)
    "empty": ("", "not a model directory"),
    "truncated": (MODEL_FILE, "onnxruntime cannot load it"),
    "not_json": (META_FILE, "not JSON"),
    "other_format": (META_FILE, "artifact format 2; this release reads format 1"),
    "not_its_graph": (MODEL_FILE, "the metadata is not this graph's"),
    "no_scaler": (META_FILE, "no 'scaler'"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_model_directory_is_refused_with_the_file_and_the_reason(tmp_path, case):
    path = broken(tmp_path, case)
    with pytest.raises(ArtifactError) as refused:
        Artifact.load(path)
    named, said = CASES[case]
    assert str(refused.value).startswith(str(path / named)) and said in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("command, case", [
    (["worker", "--data-dir", "{tmp}/state", "--bootstrap", "127.0.0.1:1"], "truncated"),
    (["score", "{cdnow}", "--out", "{tmp}/out.csv"], "not_json"),
    (["api", "--port", "1", "--snapshot", "{tmp}/clv.duckdb"], "other_format"),
    (["snapshot", "--snapshot", "{tmp}/clv.duckdb", "--bootstrap", "127.0.0.1:1"], "truncated"),
    (["demo", "--workdir", "{tmp}/demo", "--exit"], "not_its_graph"),
])
def test_every_command_that_loads_a_model_says_one_line_and_exits_2(tmp_path, command, case):
    """The worker refuses before it reaches for the broker (none answers at 127.0.0.1:1)."""
    from features.loaders import vendored_cdnow

    path = broken(tmp_path, case)
    args = [a.format(tmp=tmp_path, cdnow=vendored_cdnow()) for a in command]
    res = subprocess.run([*CLV, *args, "--model", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"clv: error: {path / CASES[case][0]}"), res.stderr
    assert res.stderr.count("\n") == 1 and CASES[case][1] in res.stderr
