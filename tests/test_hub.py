"""The converted folder on its own (no convert_mt3, offline), its model card snippet, and --push-to-hub."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile

import convert_mt3.hub
from convert_mt3.__main__ import main

from t5x_writer import TINY_MT3, TINY_MT3_GIN, tiny_arrays, write_t5x_checkpoint

FAKE_TOKEN = "hf_FAKEtokenFAKEtokenFAKEtoken0123"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return write_t5x_checkpoint(root / "model" / "checkpoint_1000", tiny_arrays(**TINY_MT3), gin=TINY_MT3_GIN)


@pytest.fixture(scope="module")
def tiny_folder(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "mt3-tiny"
    assert main([str(ckpt), str(out), "--quiet"]) == 0
    return out


def run_standalone(folder: Path, script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` on a copy of `folder`, offline, in a process where convert_mt3 cannot be imported."""
    copy = tmp_path / "elsewhere" / folder.name
    shutil.copytree(folder, copy)
    guard = "import sys\nsys.modules['convert_mt3'] = None  # any import of convert_mt3 now fails\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "MODEL": str(copy)}
    return subprocess.run(
        [sys.executable, "-c", guard + script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


AUTO_SCRIPT = textwrap.dedent(
    """
    import os, numpy as np, torch
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSeq2SeqLM,
                              AutoModelForSpeechSeq2Seq, AutoProcessor)
    path = os.environ["MODEL"]
    kw = dict(trust_remote_code=True)
    names = [type(AutoConfig.from_pretrained(path, **kw)).__name__, type(AutoModel.from_pretrained(path, **kw)).__name__,
             type(AutoModelForSeq2SeqLM.from_pretrained(path, **kw)).__name__,
             type(AutoModelForSpeechSeq2Seq.from_pretrained(path, **kw)).__name__,
             type(AutoFeatureExtractor.from_pretrained(path, **kw)).__name__, type(AutoProcessor.from_pretrained(path, **kw)).__name__]
    print(",".join(names))
    model = AutoModel.from_pretrained(path, **kw)
    processor = AutoProcessor.from_pretrained(path, **kw)
    inputs = processor(audio=np.random.default_rng(0).standard_normal(40000).astype(np.float32) * 0.1, sampling_rate=16000, return_tensors="pt")
    tokens = model.generate(input_features=inputs["input_features"], max_new_tokens=8)
    print("generated", tuple(tokens.shape))
    """
)


def check_standalone(folder: Path, tmp_path: Path) -> None:
    result = run_standalone(folder, AUTO_SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MT3Config," + "MT3ForConditionalGeneration," * 3 + "MT3FeatureExtractor,MT3Processor" in result.stdout
    assert re.search(r"generated \(2, \d+\)", result.stdout), result.stdout


def test_tiny_folder_loads_with_transformers_alone(tiny_folder, tmp_path):
    check_standalone(tiny_folder, tmp_path)


def test_real_folder_loads_with_transformers_alone(real_folder, tmp_path):
    check_standalone(real_folder, tmp_path)


def test_model_card_snippets_run(tiny_folder, tmp_path):
    """Both usage blocks of the card, executed as written (repo id -> the local folder): the 3-line pipeline block
    that opens the card, then the AutoModel + AutoProcessor one."""
    card = (tiny_folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    pipeline_block, auto_block = blocks[0], re.search(r"### Without the pipeline.*?```python\n(.*?)```", card, re.S).group(1)
    assert card.index(pipeline_block) < card.index("## Usage") and len(pipeline_block.strip().splitlines()) == 3
    assert 'pipeline("music-transcription", model="mt3-tiny"' in pipeline_block and 'from_pretrained("mt3-tiny"' in auto_block
    for name, block, written in [("pipeline", pipeline_block, "song.mid"), ("auto", auto_block, "transcription.mid")]:
        (tmp_path / name).mkdir()
        soundfile.write(tmp_path / name / "song.wav", np.zeros(8000, np.float32), 16000)
        code = "import os\n" + block.replace('"mt3-tiny"', 'os.environ["MODEL"]')
        result = run_standalone(tiny_folder, code, tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / name / written).exists()


class FakeHfApi:
    """Records the calls `push_folder` makes; can fail like an offline or unauthorised Hub."""

    calls: list = []
    fail_with: Exception | None = None
    interrupt = False
    public_repos: set = set()  # repos that exist and are public: create_repo(exist_ok) leaves them so

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_with:
            raise self.fail_with
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(("repo_info", repo_id, kwargs))
        return types.SimpleNamespace(private=repo_id not in self.public_repos)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))
        if self.interrupt:
            raise KeyboardInterrupt


@pytest.fixture
def fake_api(monkeypatch):
    FakeHfApi.calls = []
    FakeHfApi.fail_with = None
    FakeHfApi.interrupt = False
    FakeHfApi.public_repos = set()
    monkeypatch.setattr(convert_mt3.hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return FakeHfApi


def test_push_to_hub(fake_api, ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    args = [str(ckpt), str(out), "--push-to-hub", "me/mt3-tiny", "--private", "--revision", "v1", "--commit-message", "hello"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "https://huggingface.co/me/mt3-tiny/tree/v1"
    (kind0, repo0, kw0), (info, _, _), (kind1, _, kw1), (kind2, repo2, kw2) = fake_api.calls
    assert info == "repo_info"  # --private is checked, not assumed
    assert (kind0, repo0, kw0["private"], kw0["exist_ok"]) == ("create_repo", "me/mt3-tiny", True, True)
    assert (kind1, kw1["branch"], kw1["exist_ok"]) == ("create_branch", "v1", True)
    assert (kind2, repo2, kw2["revision"], kw2["commit_message"]) == ("upload_folder", "me/mt3-tiny", "v1", "hello")
    assert Path(kw2["folder_path"]) == out  # exactly the verified folder, moved into place
    assert kw2["files"] == sorted(p.name for p in out.iterdir()) and "model.safetensors" in kw2["files"]
    assert 'from_pretrained("me/mt3-tiny"' in (out / "README.md").read_text()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    # a re-run is idempotent: same calls, same folder
    fake_api.calls = []
    assert main(args + ["--overwrite"]) == 0
    assert [c[0] for c in fake_api.calls] == ["create_repo", "repo_info", "create_branch", "upload_folder"]


def test_private_into_an_existing_public_repo_is_refused(fake_api, ckpt, tmp_path, capsys):
    fake_api.public_repos = {"me/mt3-tiny"}
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--quiet", "--push-to-hub", "me/mt3-tiny", "--private"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: push to me/mt3-tiny: --private, but the repo exists and is public; nothing uploaded")
    assert "upload_folder" not in [c[0] for c in fake_api.calls] and (out / "model.safetensors").exists()
    # without --private the public repo is what the user asked for
    assert main([str(ckpt), str(out), "--quiet", "--overwrite", "--push-to-hub", "me/mt3-tiny"]) == 0
    assert fake_api.calls[-1][0] == "upload_folder"


def test_push_failure_is_one_line_and_keeps_folder(fake_api, ckpt, tmp_path, capsys):
    fake_api.fail_with = ConnectionError(f"cannot reach huggingface.co (Authorization: Bearer {FAKE_TOKEN})")
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--quiet", "--push-to-hub", "me/mt3-tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: push to me/mt3-tiny failed: ConnectionError") and len(err.splitlines()) == 1
    assert err.endswith(f"; {out} is complete") and FAKE_TOKEN not in err
    assert (out / "model.safetensors").exists()


def test_ctrl_c_during_the_push_says_the_folder_is_written(fake_api, ckpt, tmp_path, capsys):
    fake_api.interrupt = True
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--quiet", "--push-to-hub", "me/mt3-tiny"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted during the push to me/mt3-tiny; {out} is complete, the repo may not have it"
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no lock file left


@pytest.mark.parametrize("flag", [["--private"], ["--revision", "v1"], ["--commit-message", "hello"]])
def test_hub_flags_need_push(ckpt, tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(ckpt), str(tmp_path / "out"), *flag])
    assert info.value.code == 2 and "need --push-to-hub" in capsys.readouterr().err


def test_a_bad_repo_id_is_refused_before_converting(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([str(ckpt), str(out), "--quiet", "--push-to-hub", "bad id!!"])
    assert exit_.value.code == 2 and "argument --push-to-hub: " in capsys.readouterr().err
    assert not out.exists()
