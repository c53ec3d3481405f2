"""Data-parallel training (torchrun, gloo, 2 CPU processes) against one process: exact.

DFT's normalisation must be global: every micro-batch's loss on every rank is divided by the
number of target tokens of the whole global batch (all ranks, all accumulation steps). Then
2 processes x micro-batch 2 give the same loss curve, diagnostics and adapter weights as
1 process x micro-batch 4 on the same data and seed, even when the two ranks' micro-batches hold
very different numbers of target tokens. The single-process run is the independent reference:
any per-rank normalisation (rank-local token means, averaged by DDP) would weight the ranks'
tokens unequally and fail here.

One `torchrun` launch runs all the cases one after another (a launch costs ~10 s of imports on
2 cores); a worker records, per rank and micro-batch, the target tokens it saw and the divisor
it was given, so the test also checks the divisor itself. The same launch then starts a long run
and the test kills its rank 1 with SIGKILL (what the OOM killer does): the run must end at once
with one line, and `torchrun -m dft_peft train` with `auto_resume_from_checkpoints` must continue
from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_models
import tiny_run

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with gloo is needed for the 2-process tests",
    ),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds rank 1's process through /proc (Linux)"),
]

TOL = 1e-5
STEPS = 3
KILL_STEPS = 24
# name -> config overrides (micro_batch_size is set per side: 2 per rank, 4 in the reference)
CASES = {
    "dft": {"loss": "dft"},
    "sft_accum": {"loss": "sft", "gradient_accumulation_steps": 2},
    "dft_packed_accum": {"loss": "dft", "sample_packing": True, "gradient_accumulation_steps": 2, "sequence_len": 256},
}

# Records each micro-batch's target-token count and the divisor the Trainer passed, per rank.
WORKER = '''
import json, os, sys
import yaml
import dft_peft.train as train_module
from dft_peft.cli import main

SEEN = []

class RecordingTrainer(train_module.AtomicCheckpointTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        targets = int((inputs["labels"][..., 1:] != -100).sum())
        SEEN.append([self.state.global_step, targets, float(num_items_in_batch)])
        return super().training_step(model, inputs, num_items_in_batch)

train_module.AtomicCheckpointTrainer = RecordingTrainer
for path in sys.argv[1:]:
    if path.startswith("--fsdp-check="):  # raw FSDP2 on the process group the runs left behind
        import test_distributed
        test_distributed.fsdp2_check(path.split("=", 1)[1])
        continue
    SEEN.clear()
    if main(["train", path]) != 0:
        sys.exit(1)
    out = yaml.safe_load(open(path))["output_dir"]
    with open(os.path.join(out, "seen-rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(SEEN, f)
'''


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here), env.get("PYTHONPATH", "")])
    return env


def _torchrun(*args: str) -> list[str]:
    # --master-port 0 is not accepted with a static rendezvous; a free port from the OS is.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={_free_port()}", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uneven_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows whose answers range from 2 to ~40 tokens, so ranks see uneven target counts."""
    rng = random.Random(seed)
    rows = tiny_run.alpaca_rows(n, seed=seed)
    for i, row in enumerate(rows):
        words = row["output"].split()
        row["output"] = " ".join(words[: 2 + (i * 7) % 5] + words * rng.choice([0, 0, 1, 3]))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = tiny_run.tiny_model_dir(tmp_path_factory)
    data = tiny_run.write_jsonl(root / "data.jsonl", uneven_rows(96))  # >= 3 full global batches, packed too
    return root, model, data


def _config(setup, name: str, side: str, **extra) -> dict:
    root, model, data = setup
    overrides = {**CASES[name], **extra} if name in CASES else extra
    overrides.setdefault("sequence_len", 160)
    # Adam moves each weight by ~lr whatever the gradient's size, so float32 rounding in a
    # near-zero gradient element becomes a weight difference of up to ~lr * 1e-3; lr 1e-3 keeps
    # that under TOL. The gradient's scale, which Adam hides, is checked through grad_norm.
    overrides.setdefault("learning_rate", 1e-3)
    overrides = {"max_steps": STEPS, "micro_batch_size": 2 if side == "ddp" else 4, **overrides}
    return tiny_run.config_dict(model, data, root / f"{side}-{name}", **overrides)


@dataclass
class Launch:
    outputs: dict[str, Path]  # case -> output_dir of the 2-process run
    log: str
    kill_config: dict  # the run whose rank 1 was killed
    kill_rc: int
    ended_in: float  # seconds from the kill to the launcher's exit


@pytest.fixture(scope="module")
def launch(setup) -> Launch:
    """One 2-process torchrun launch: every case in CASES, then a long run whose rank 1 gets
    SIGKILL once its checkpoint-2 is complete (what the OOM killer does)."""
    root = setup[0]
    worker = root / "worker.py"
    worker.write_text(WORKER)
    paths = [tiny_run.write_yaml(root / f"ddp-{name}.yml", _config(setup, name, "ddp")) for name in CASES]
    # Long enough that rank 1 is killed mid-run (~20 steps after checkpoint-2), short enough that
    # the resume (same max_steps: a changed schedule is refused) takes seconds.
    kill_cfg = _config(setup, "kill", "ddp", max_steps=KILL_STEPS, save_steps=2, save_total_limit=2, loss="dft")
    paths.append(f"--fsdp-check={root / 'fsdp2.json'}")
    paths.append(tiny_run.write_yaml(root / "kill.yml", kill_cfg))
    checkpoint = Path(kill_cfg["output_dir"]) / "checkpoint-2"
    log_path = root / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _torchrun(str(worker), *map(str, paths)), env=_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 400
            while not checkpoint.is_dir():
                assert proc.poll() is None, log_path.read_text()[-6000:]
                assert time.monotonic() < deadline, "no checkpoint-2 of the kill run within 400 s"
                time.sleep(0.05)
            victim = _rank_pid(proc.pid, 1)
            assert victim is not None, "rank 1's process not found"
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            rc = proc.wait(timeout=120)  # a hang fails here
            ended_in = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    outputs = {name: root / f"ddp-{name}" for name in CASES}
    return Launch(outputs, log_path.read_text(), kill_cfg, rc, ended_in)


def _history(output_dir: Path) -> list[dict]:
    return [h for h in json.loads((output_dir / "log_history.json").read_text()) if "loss" in h]


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process_with_the_same_global_batch(setup, launch, name):
    from dft_peft.config import Config
    from dft_peft.train import train

    outputs = launch.outputs
    reference = train(Config.from_dict(_config(setup, name, "single")))
    ddp_dir = outputs[name]

    # The divisor is the global batch's target-token count, and the ranks' shares are uneven.
    seen = [json.loads((ddp_dir / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    accum = CASES[name].get("gradient_accumulation_steps", 1)
    for step in range(STEPS):
        mine = [[t for s, t, _ in rank_seen if s == step] for rank_seen in seen]
        assert all(len(m) == accum for m in mine), mine
        divisors = {d for rank_seen in seen for s, _, d in rank_seen if s == step}
        assert divisors == {float(sum(mine[0]) + sum(mine[1]))}, (step, mine, divisors)
    assert any(a != b for a, b in zip(*[[t for _, t, _ in r] for r in seen])), "ranks' target counts are all equal"

    # Same loss curve and global diagnostics, step by step.
    ddp_history, ref_history = _history(ddp_dir), _history(reference.output_dir)
    assert [h["step"] for h in ddp_history] == [h["step"] for h in ref_history] == list(range(1, STEPS + 1))
    for got, want in zip(ddp_history, ref_history):
        for key in ("loss", "ce", "p_mean", "token_acc", "entropy"):
            assert got[key] == pytest.approx(want[key], abs=TOL), (got["step"], key, got[key], want[key])
        # The global gradient's norm before clipping: a wrong divisor (per rank, or off by the
        # world size) changes it by percents; float32 summation order by ~1e-6.
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (got["step"], got["grad_norm"], want["grad_norm"])

    # Same adapter after the optimizer steps.
    got, want = _adapter(ddp_dir), _adapter(reference.output_dir)
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    moved = max(want[k].abs().max().item() for k in want if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3, "the adapter did not train"  # ~STEPS * lr
    assert worst < TOL, f"adapter differs by {worst:.2e}"


def test_main_process_alone_prepares_data_and_writes_outputs(launch):
    outputs, log = launch.outputs, launch.log
    out = outputs["dft"]
    # One prepared-data cache, built once (rank 0) and read by rank 1.
    caches = [p for p in (out / "prepared").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1 and (caches[0] / "prepared.json").is_file()
    assert log.count("Saved prepared datasets to") == len(CASES) + 1  # + the kill run
    # Progress lines and the final line once per case, not once per rank.
    assert log.count("done: 3 steps") == len(CASES)
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".tmp-*")), "a half-written output folder was left behind"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for child in _children(launcher_pid):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


def test_killed_rank_ends_the_run_with_one_line_and_resume_continues(launch):
    text, cfg = launch.log, dict(launch.kill_config)
    out = Path(cfg["output_dir"])
    assert launch.kill_rc != 0
    assert launch.ended_in < 60, f"the run took {launch.ended_in:.0f} s to end after the kill"
    ours = [line for line in text.splitlines() if line.startswith("dft-peft: error:")]
    assert len(ours) == 1, text[-4000:]
    assert "auto_resume_from_checkpoints: true" in ours[0] and "checkpoint-" in ours[0]
    assert "Connection reset by peer" not in text  # no gloo traceback from a survivor

    # Resume under the same launcher: continues from the last complete checkpoint, to the end.
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.23"):
        # transformers 5.16 (Axolotl 0.19's pin) loads a multi-process run's optimizer state with
        # map_location=args.device, which on CPU is `cpu:<rank>` and fails to load; GPUs (cuda:N)
        # and our pinned 5.23 ("cpu") are fine.
        pytest.skip(f"transformers {transformers.__version__} cannot resume a multi-process CPU run")
    from dft_peft.training.checkpoint_folders import last_checkpoint

    last = last_checkpoint(out)
    assert last is not None
    resumed_step = int(last.name.split("-")[1])
    end = KILL_STEPS
    assert resumed_step < end - 4, f"rank 1 was killed too late (checkpoint-{resumed_step})"
    cfg.update(auto_resume_from_checkpoints=True, save_steps=1000)
    config = tiny_run.write_yaml(out.parent / "resume.yml", cfg)
    proc = subprocess.run(
        _torchrun("-m", "dft_peft", "train", str(config)), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from {last}" in proc.stdout + proc.stderr
    assert f"done: {end} steps" in proc.stdout
    steps = [h["step"] for h in _history(out)]
    assert steps == list(range(1, end + 1)), steps  # the first steps from the checkpoint's history


# ----------------------------------------------------------------------------- FSDP2
#
# accelerate 1.15 shards only on CUDA devices (on CPU it trains DDP), so the Trainer's FSDP path
# cannot run here. What can: torch's own FSDP2 (`fully_shard`) on gloo, with a LoRA model whose
# objective is patched in, exactly as accelerate wraps it (each decoder layer, then the root).
# The LM head is then a DTensor shard until the root's forward gathers it; the fused loss must
# see the whole head and give the single-process gradients.


def _fsdp_model_and_batch():
    from peft import LoraConfig, get_peft_model

    from dft_peft import patch_model

    model = tiny_models.tiny_causal_lm("llama", seed=0).train()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora)
    patch_model(model, loss="dft")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tiny_models.VOCAB, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[0, 5:13] = -100  # rank 0's rows hold far fewer targets than rank 1's
    return model, ids, labels


def _lora_grads(model) -> dict[str, list]:
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad
            out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).tolist()
    return out


def fsdp2_check(out_path: str) -> None:
    """Runs in each torchrun rank: 2 rows per rank under FSDP2; rank 0 writes loss and grads."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model, ids, labels = _fsdp_model_and_batch()
    total = torch.tensor(int((labels[..., 1:] != -100).sum()))  # the global batch's targets
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    head = model.base_model.model.lm_head.weight
    sharded_head = [type(head).__name__, list(head.to_local().shape)] if hasattr(head, "to_local") else None
    rows = slice(2 * rank, 2 * rank + 2)
    loss = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=total).loss
    (loss * world).backward()  # as the Trainer does: x world size, FSDP averages the gradients
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    grads = _lora_grads(model)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"loss": summed.item(), "grads": grads, "head": sharded_head}))
    dist.barrier()


def test_fsdp2_sharded_head_fused_loss_equals_one_process(launch):
    got = json.loads((launch.outputs["dft"].parent / "fsdp2.json").read_text())
    assert got["head"] == ["DTensor", [tiny_models.VOCAB // 2, 32]], got["head"]  # really sharded
    model, ids, labels = _fsdp_model_and_batch()
    total = torch.tensor(int((labels[..., 1:] != -100).sum()))
    loss = model(input_ids=ids, labels=labels, num_items_in_batch=total).loss
    loss.backward()
    want = _lora_grads(model)
    assert got["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert got["grads"].keys() == want.keys()
    worst = max((torch.tensor(got["grads"][k]) - torch.tensor(want[k])).abs().max().item() for k in want)
    assert worst < 1e-6, f"LoRA gradients differ by {worst:.2e}"


def test_fsdp_config_is_checked_and_refused_on_cpu(setup):
    from dft_peft.config import Config
    from dft_peft.errors import UserError
    from dft_peft.train import train

    base = _config(setup, "fsdp", "single")
    with pytest.raises(Exception, match="fsdp_config: unknown key `fsdp_reshard_after_forwrd`"):
        Config.from_dict({**base, "fsdp_version": 2, "fsdp_config": {"fsdp_reshard_after_forwrd": True}})
    with pytest.raises(Exception, match="only FSDP2"):
        Config.from_dict({**base, "fsdp_config": {"fsdp_version": 3}})
    # FSDP1 (as older Axolotl configs write it) runs as FSDP2, with a note (tests/test_axolotl_round2.py).
    legacy = Config.from_dict({**base, "fsdp_config": {"fsdp_version": 1}})
    assert legacy.fsdp_version == 2 and "FSDP1 settings run as FSDP2" in legacy.ignored_keys["fsdp"]
    # Axolotl's spelling (prefixed or not) loads; on a CPU it is refused before anything loads.
    cfg = Config.from_dict(
        {**base, "fsdp_version": 2, "fsdp_config": {"fsdp_offload_params": False, "reshard_after_forward": True,
                                                     "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}
    )
    assert cfg.fsdp_config == {"offload_params": False, "reshard_after_forward": True,
                               "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU runs")
    with pytest.raises(UserError, match="needs CUDA GPUs"):
        train(cfg)
