"""Models and datasets from the hub, through the real `huggingface_hub` and `datasets` clients
talking to a stand-in hub on 127.0.0.1 (tests/hub_server.py). Nothing of the clients is mocked.

Every client run is a subprocess (marked `slow`): huggingface_hub and datasets read HF_ENDPOINT, HF_HUB_OFFLINE and
HF_HOME once, at import, and scripts/setup-env.sh exports HF_HUB_OFFLINE=1 for the whole test
run. Each test gets its own HF_HOME, so the user's cache is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hub_server import HubServer, Repo, repo_from_folder
from tiny_run import alpaca_rows, config_dict, tiny_model_dir

MODEL_ID = "tiny-org/tiny-llama"
DATA_ID = "tiny-org/tiny-alpaca"
# Copies of the weights in formats loading does not need: never to be requested.
UNNEEDED = {
    "pytorch_model.bin": b"not needed",
    "model.Q4_K_M.gguf": b"GGUF not needed",
    "onnx/model.onnx": b"onnx not needed",
    "original/consolidated.00.pth": b"pth not needed",
}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def hub(model_dir):
    """A stand-in hub with the tiny model (plus unneeded weight copies) and an Alpaca dataset repo."""
    server = HubServer().start()
    model = repo_from_folder(MODEL_ID, model_dir)
    server.add(Repo(MODEL_ID, "model", {**model.files, **UNNEEDED}))
    server.add(
        Repo(
            DATA_ID,
            "dataset",
            {
                "data/train.jsonl": _jsonl(alpaca_rows(12, seed=1)),
                "data/test.jsonl": _jsonl(alpaca_rows(3, seed=2)),
                "other/extra.jsonl": _jsonl(alpaca_rows(5, seed=3)),
            },
        )
    )
    yield server
    server.stop()


def _env(home: Path, endpoint: str, *, offline: bool = False, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", **extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _python(code: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


def _dead_endpoint() -> str:
    """A port on 127.0.0.1 with nothing listening: the hub is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _write_config(tmp_path: Path, name: str = "run.yml", **overrides) -> Path:
    out = tmp_path / ("out" if name == "run.yml" else f"out-{Path(name).stem}")  # one output_dir per config
    cfg = config_dict(Path("unused"), Path("unused"), out, max_steps=2, **overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


HUB_CONFIG = dict(
    base_model=MODEL_ID,
    datasets=[{"path": DATA_ID, "type": "alpaca", "data_files": ["data/train.jsonl"], "split": "train"}],
)


@pytest.mark.slow
def test_train_downloads_then_trains_offline_from_the_cache(hub, tmp_path):
    home, cfg = tmp_path / "hf", _write_config(tmp_path, **HUB_CONFIG)
    train = [sys.executable, "-m", "dft_peft.cli", "train", str(cfg)]

    first = subprocess.run(train, env=_env(home, hub.url), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: 2 steps" in first.stdout
    requested = {path.rsplit("/", 1)[-1] for _, path, _ in hub.requests if "/resolve/" in path}
    assert "model.safetensors" in requested and "tokenizer.json" in requested and "train.jsonl" in requested
    assert not requested & {"pytorch_model.bin", "model.Q4_K_M.gguf", "model.onnx", "consolidated.00.pth"}
    snapshot = home / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / hub.repos[("model", MODEL_ID)].sha
    served = hub.repos[("model", MODEL_ID)].files["model.safetensors"]
    assert (snapshot / "model.safetensors").read_bytes() == served

    endpoint = hub.url
    hub.stop()  # nothing listens there any more
    second = subprocess.run(
        train + ["--output_dir", str(tmp_path / "out-offline")],
        env=_env(home, endpoint, offline=True), capture_output=True, text=True, timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "done: 2 steps" in second.stdout
    # Same model, data and seed from the cache: the same first-step loss as the downloading run.
    first_log = [json.loads((tmp_path / d / "train_metrics.json").read_text())["first_log"] for d in ("out", "out-offline")]
    assert first_log[0]["loss"] == pytest.approx(first_log[1]["loss"], rel=1e-6)


@pytest.mark.slow
def test_dropped_connection_resumes_with_the_same_bytes(tmp_path):
    """The server cuts the first download of a 24 MB shard at 15 MB; huggingface_hub retries with
    a Range request from the last whole chunk it wrote (10 MiB) and the cached file is byte-exact."""
    shard = hashlib.sha256(b"seed").digest() * (24 * 1024 * 1024 // 32)
    with HubServer() as server:
        repo = server.add(Repo("tiny-org/big", "model", {"config.json": b"{}", "model.safetensors": shard}))
        repo.drop_after["model.safetensors"] = 15 * 1024 * 1024
        done = _python("from dft_peft.model import hub; print(hub.fetch('tiny-org/big'))", _env(tmp_path / "hf", server.url))
        ranges = [r for m, p, r in server.requests if m == "GET" and p.endswith("model.safetensors")]
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("tiny-org/big", "model.safetensors") in server._dropped
    assert ranges[0] is None and ranges[-1] is not None, ranges
    resumed_at = int(ranges[-1].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= 15 * 1024 * 1024
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).digest() == hashlib.sha256(shard).digest()


# One process runs the CLI for several configs (huggingface_hub reads HF_ENDPOINT at import).
_CLI_DRIVER = """
    import contextlib, io, json, os, sys
    from dft_peft.cli import main
    out = []
    for argv, token in json.loads(sys.argv[1]):
        if token:
            os.environ["HF_TOKEN"] = token
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        out.append([code, err.getvalue()])
    print(json.dumps(out))
"""


def _run_cli(runs, env) -> list[tuple[int, list[str]]]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CLI_DRIVER), json.dumps(runs)], env=env, capture_output=True, text=True,
        timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(code, [line for line in err.splitlines() if line.startswith("dft-peft: error:")]) for code, err in results]


def _adapter_folder(model_dir: Path, out: Path) -> Path:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.mark.slow
def test_missing_gated_and_too_big_repos_are_one_line_each(hub, model_dir, tmp_path):
    files = dict(hub.repos[("model", MODEL_ID)].files)
    hub.add(repo_from_folder("tiny-org/tiny-adapter", _adapter_folder(model_dir, tmp_path / "adapter")))
    hub.add(Repo("tiny-org/gated-llama", "model", files, gated_token="hf_right"))
    hub.add(Repo("tiny-org/huge-llama", "model", files, listed_sizes={"model.safetensors": 10**16}))  # 10 PB
    home = tmp_path / "hf"
    (home / "hub" / f"models--{MODEL_ID.replace('/', '--')}").mkdir(parents=True)  # a cached id close to the typo
    local_data = tmp_path / "train.jsonl"
    local_data.write_bytes(_jsonl(alpaca_rows(8)))
    data = [{"path": str(local_data), "type": "alpaca"}]
    missing = _write_config(tmp_path, "missing.yml", base_model="tiny-org/tiny-lama", datasets=data)
    gated = _write_config(tmp_path, "gated.yml", base_model="tiny-org/gated-llama", datasets=data)
    huge = _write_config(tmp_path, "huge.yml", base_model="tiny-org/huge-llama", datasets=data)
    every_key = _write_config(  # each model key a hub id
        tmp_path, "keys.yml", base_model=MODEL_ID, base_model_config=MODEL_ID, tokenizer_config=MODEL_ID,
        lora_model_dir="tiny-org/tiny-adapter", datasets=data,
    )
    results = _run_cli(
        [[["train", str(missing)], None], [["train", str(gated)], None], [["train", str(huge)], None],
         [["validate", str(every_key)], None], [["validate", str(gated)], "hf_right"]],
        _env(home, hub.url),
    )
    (code_404, lines_404), (code_401, lines_401), (code_disk, lines_disk), (code_keys, lines_keys), (code_ok, lines_ok) = results
    print(*lines_404, *lines_401, *lines_disk, sep="\n")
    assert code_404 == 2 and len(lines_404) == 1, lines_404
    assert "tiny-org/tiny-lama" in lines_404[0] and "not found" in lines_404[0] and MODEL_ID in lines_404[0]
    assert code_401 == 2 and len(lines_401) == 1, lines_401
    assert "gated" in lines_401[0] and "hf auth login" in lines_401[0] and "licence" in lines_401[0]
    assert code_disk == 2 and len(lines_disk) == 1, lines_disk
    assert "not enough disk space" in lines_disk[0] and str(home / "hub") in lines_disk[0] and "needs 10000000.00 GB" in lines_disk[0]
    assert not any("huge-llama/resolve" in p for _, p, _ in hub.requests)  # stopped before downloading
    assert code_keys == 0 and not lines_keys
    assert any(p.endswith("tiny-adapter/resolve/" + hub.repos[("model", "tiny-org/tiny-adapter")].sha + "/adapter_model.safetensors")
               for _, p, _ in hub.requests)
    assert code_ok == 0 and not lines_ok  # the same repo with the right token


@pytest.mark.slow
def test_hub_down_is_one_line_naming_the_offline_cache(tmp_path):
    cfg = _write_config(tmp_path, **HUB_CONFIG)
    [(code, lines)] = _run_cli([[["train", str(cfg)], None]], _env(tmp_path / "hf", _dead_endpoint()))
    print(*lines)
    assert code == 2 and len(lines) == 1, lines
    assert "unreachable" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and MODEL_ID in lines[0]


_DATA_DRIVER = """
    import json, sys
    from dft_peft.data.cache import _files_fingerprint
    from dft_peft.data.loading import load_raw
    from dft_peft.config.datasets import DatasetConfig
    out = []
    for entry in json.loads(sys.argv[1]):
        cfg = DatasetConfig(path="%s", type="alpaca", **entry)
        ds = load_raw(cfg)
        out.append([len(ds), ds[0]["instruction"], _files_fingerprint(cfg)])
    print(json.dumps(out))
""" % DATA_ID


def _load_rows(entries, env):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DATA_DRIVER), json.dumps(entries)], env=env, capture_output=True,
        text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_hub_dataset_split_and_data_files(hub, tmp_path):
    repo = hub.repos[("dataset", DATA_ID)]
    entries = [
        {"data_files": "data/train.jsonl"},
        {"data_files": ["data/test.jsonl"], "split": "test"},
        {"split": "test"},  # split inferred from the file names
        {"data_files": "data/*.jsonl"},
        {"data_files": "other/extra.jsonl", "ds_type": "json"},
    ]
    home = tmp_path / "hf"
    got = _load_rows(entries, _env(home, hub.url))
    expected = [
        (12, alpaca_rows(12, seed=1)[0]),
        (3, alpaca_rows(3, seed=2)[0]),
        (3, alpaca_rows(3, seed=2)[0]),
        (15, None),
        (5, alpaca_rows(5, seed=3)[0]),
    ]
    for (n, first, fingerprint), (want_n, want_first) in zip(got, expected):
        assert n == want_n
        if want_first is not None:
            assert first == want_first["instruction"]
        assert fingerprint == [["hub", DATA_ID, repo.sha]]  # the cache key holds the resolved commit

    # Offline, the same entries come from the cache; a new commit on the hub changes the key.
    offline = _load_rows(entries[:2], _env(home, _dead_endpoint(), offline=True))
    assert [row[:2] for row in offline] == [row[:2] for row in got[:2]]
    old_sha = repo.sha
    repo.files["data/train.jsonl"] = _jsonl(alpaca_rows(4, seed=5))
    repo.sha = ""
    repo.__post_init__()
    [(n, _, fingerprint)] = _load_rows(entries[:1], _env(home, hub.url))
    assert n == 4 and fingerprint == [["hub", DATA_ID, repo.sha]] and repo.sha != old_sha


# ----------------------------------------------------------------------------- no server needed


LLAMA_REPO = [
    "config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "original/consolidated.00.pth",
    "original/tokenizer.model", "original/params.json", "README.md", "LICENSE", "model.Q4_K_M.gguf", "onnx/model.onnx",
]


def test_only_what_loading_needs_is_chosen():
    from dft_peft.model.hub import choose_files

    assert choose_files(LLAMA_REPO, "model") == sorted(
        ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    )
    bin_only = [f for f in LLAMA_REPO if "safetensors" not in f]
    assert "pytorch_model-00001-of-00002.bin" in choose_files(bin_only, "model")
    assert choose_files(LLAMA_REPO, "config") == ["config.json", "generation_config.json"]
    assert not any("safetensors" in f or f.endswith(".bin") for f in choose_files(LLAMA_REPO, "tokenizer"))
    assert choose_files(LLAMA_REPO, "model", gguf_file="model.Q4_K_M.gguf") == ["model.Q4_K_M.gguf"]


def test_gguf_only_repo_names_its_files():
    from dft_peft.errors import UserError
    from dft_peft.model.hub import choose_files

    ggufs = ["README.md", "m.Q4_K_M.gguf", "m.Q8_0.gguf"]
    with pytest.raises(UserError, match=r"holds GGUF files only: add `gguf_file:` naming one of m\.Q4_K_M\.gguf, m\.Q8_0\.gguf"):
        choose_files(ggufs, "model", repo_id="org/m-GGUF")
    with pytest.raises(UserError, match=r"gguf_file `m\.Q4_K_S\.gguf` is not in `org/m-GGUF`.*Did you mean `m\.Q4_K_M\.gguf`"):
        choose_files(ggufs, "model", gguf_file="m.Q4_K_S.gguf", repo_id="org/m-GGUF")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU machine's notes")
def test_validate_gpu_config_on_cpu_lists_notes(capsys):
    """The Colab T4 example (fp16, 4-bit, paged optimizer) is valid on a CPU: validate exits 0 and
    says what would differ here; `train` still stops on fp16 (tests/test_cli.py::test_fp16_on_cpu)."""
    from dft_peft.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "yaml" / "colab-t4-qlora-dft.yml"
    assert main(["validate", str(example)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert any("fp16: true needs a CUDA GPU" in n for n in notes), out[-2000:]
    assert any("4-bit" in n for n in notes) and any("paged_adamw_8bit" in n for n in notes)
