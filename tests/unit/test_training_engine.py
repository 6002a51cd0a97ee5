"""The training engine on a toy recipe (tests/unit/training_toy_recipe.py): config errors, the same result
on 1 and 2 processes (DDP under
`accelerate launch`, FSDP under torchrun, both over gloo), SIGTERM + --resume, a full disk, metrics and the plot.

Tolerances: 2 processes vs 1, and interrupted+resumed vs uninterrupted, must agree to 1e-5 absolute on
every trained weight and 1e-5 relative on every step's loss (observed: <= 1e-7, float summation order).
Every launched run has a hard timeout that kills its whole process group.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training_toy_recipe as toy
from training import checkpoint, engine
from training.__main__ import main
from training.config import ConfigError, load_config
from training.sampler import GlobalBatchSampler

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 150
STEPS, BATCH = 6, 4
WEIGHT_ATOL, LOSS_RTOL = 1e-5, 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small CPU models on a shared 2-core machine: a second intra-op thread only adds contention (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def launched_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "unit")]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=launched_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def finish(process: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    """Wait for a launched run; past the timeout, kill its whole process group (torchrun + workers)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"launched run still going after {timeout}s; process group killed. Output:\n{output[-4000:]}")
    return process.returncode, output


def torchrun(*args: str) -> tuple[int, str]:
    return finish(start(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "training", "training_toy_recipe", *args]))


def train_args(out_dir: Path, **train) -> list[str]:
    settings = {"out_dir": out_dir, "steps": STEPS, "batch_size": BATCH, "device": "cpu", **train}
    return [f"train.{key}={value}" for key, value in settings.items()]


def train_here(out_dir: Path, resume: bool = False, **train) -> engine.RunResult:
    recipe_config, train_config = load_config(toy.RecipeConfig, None, train_args(out_dir, **train))
    return engine.run(toy, recipe_config, train_config, resume=resume)


def losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out_dir: Path, reference: Path) -> None:
    trained, expected = (load_file(str(d / "export" / "toy.safetensors")) for d in (out_dir, reference))
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    assert losses(out_dir) == pytest.approx(losses(reference), rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the result every other run must reproduce."""
    out_dir = tmp_path_factory.mktemp("reference")
    result = train_here(out_dir, checkpoint_every=2, keep_checkpoints=2)
    assert result.completed and result.step == STEPS
    return out_dir


def test_unknown_or_mistyped_config_keys_are_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("recipe:\n  width: 8\ntrain:\n  stepz: 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(toy.RecipeConfig, config)
    message = str(error.value)
    assert "train.stepz" in message and "steps" in message and "batch_size" in message
    with pytest.raises(ConfigError, match=r"recipe\.depth.*valid keys in recipe: items, width, lr, step_sleep"):
        load_config(toy.RecipeConfig, None, ["recipe.depth=3"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 'many'"):
        load_config(toy.RecipeConfig, None, ["train.steps=many"])
    recipe_config, train_config = load_config(toy.RecipeConfig, None, ["recipe.lr=1e-3", "train.steps=7"])
    assert recipe_config.lr == 0.001 and train_config.steps == 7

    assert main(["training_toy_recipe", "--config", str(config)]) == 2
    stderr = capsys.readouterr().err
    assert "train.stepz" in stderr and "Traceback" not in stderr


def test_a_missing_dataset_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code = main(["diffrir", f"recipe.images={missing}", "recipe.preset=tiny", f"train.out_dir={tmp_path / 'run'}"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert str(missing) in stderr and "does not exist" in stderr and "Traceback" not in stderr


def test_the_global_batch_does_not_depend_on_the_world_size():
    single = GlobalBatchSampler(10, 4, seed=3)
    halves = [GlobalBatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(7):  # 28 items: epochs of 10 straddle steps
        assert single.local(step) == halves[0].local(step) + halves[1].local(step) == single.global_batch(step)
    first_epoch = [index for step in range(5) for index, _ in single.local(step)][:10]
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    seeds = [seed for step in range(7) for _, seed in single.local(step)]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError, match="must divide by the 3 processes"):
        GlobalBatchSampler(10, 4, seed=0, world_size=3)


def test_metrics_checkpoints_and_the_loss_curve_plot(reference, tmp_path):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert set(record) == {"step", "loss", "terms", "lr", "samples_per_s", "elapsed", "peak_rss_mib"}
        assert record["peak_rss_mib"] > 50
        assert record["terms"]["mse"] == pytest.approx(record["loss"]) and record["samples_per_s"] > 0
        assert record["lr"] == {"blocks": 0.02, "head": 0.01}
    # keep_checkpoints=2 of those at steps 2, 4, 6; `latest` names the newest
    root = reference / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert checkpoint.latest_checkpoint(reference) == root / "step-00000006"

    png = tmp_path / "curves" / "loss.png"
    assert main(["plot", str(reference / "metrics.jsonl"), "--out", str(png)]) == 0
    from PIL import Image
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 400
        assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 10  # curves drawn, not a blank canvas


def test_two_ddp_processes_under_accelerate_launch_match_one_process(reference, tmp_path):
    # accelerate's --multi_gpu launcher is torchrun underneath and also runs CPU processes (gloo);
    # its --cpu flag alone would start a single process.
    code, output = finish(start(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 "-m", "training", "training_toy_recipe", *train_args(tmp_path, strategy="ddp")]))
    assert code == 0, output[-4000:]
    assert "global batch 4 over 2 process(es) (ddp)" in output
    assert_same_run(tmp_path, reference)


def test_fsdp_on_two_processes_resumes_a_checkpoint_and_matches(reference, tmp_path):
    train_here(tmp_path, steps=4)  # the first 4 steps on one process; FSDP continues on two
    code, output = torchrun(*train_args(tmp_path, strategy="fsdp"), "--resume")
    assert code == 0, output[-4000:]
    assert "(fsdp)" in output and "resumed from" in output and "step-00000004" in output
    assert_same_run(tmp_path, reference)
    # FSDP's final checkpoint (gathered from both shards) holds the same weights and AdamW moments
    weights, optimizer, state = checkpoint.load(tmp_path / "checkpoints" / "step-00000006")
    expected_weights, expected_optimizer, _ = checkpoint.load(reference / "checkpoints" / "step-00000006")
    assert state["world_size"] == 2 and state["strategy"] == "fsdp"
    torch.testing.assert_close(weights, expected_weights, atol=WEIGHT_ATOL, rtol=0)
    torch.testing.assert_close(optimizer["optimizer"]["state"], expected_optimizer["optimizer"]["state"],
                               atol=WEIGHT_ATOL, rtol=1e-4)


def test_sigterm_saves_and_resume_reaches_the_uninterrupted_result(tmp_path):
    steps = 30
    reference_dir = tmp_path / "uninterrupted"
    train_here(reference_dir, steps=steps)
    interrupted = tmp_path / "interrupted"
    process = start(["-m", "training", "training_toy_recipe", *train_args(interrupted, steps=steps),
                     "recipe.step_sleep=0.15"])
    metrics, deadline = interrupted / "metrics.jsonl", time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert process.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.05)
    except AssertionError:
        kill_group(process)
        raise
    process.send_signal(signal.SIGTERM)
    code, output = finish(process)
    assert code == 0, output[-3000:]
    stopped_at = json.loads((checkpoint.latest_checkpoint(interrupted) / "state.json").read_text())["step"]
    assert 3 <= stopped_at < steps and "SIGTERM: stopped after step" in output
    assert not (interrupted / "export").exists()  # exported only when a run completes

    result = train_here(interrupted, resume=True, steps=steps)
    assert result.completed and result.step == steps
    assert_same_run(interrupted, reference_dir)


def test_out_of_disk_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    real_save_file, calls = checkpoint.save_file, []

    def disk_fills_up(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 2:  # the second checkpoint finds the disk full halfway through
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_up)
    with pytest.raises(checkpoint.CheckpointError) as error:
        train_here(tmp_path, checkpoint_every=2)
    message = str(error.value)
    assert "step 4" in message and "No space left on device" in message and "step-00000002" in message
    assert "intact" in message and "--resume" in message
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]  # no partial folder left
    weights, _, state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 2 and set(weights) == {n for n, p in toy.Toy(16, 0).named_parameters() if p.requires_grad}

    monkeypatch.setattr(checkpoint, "save_file", real_save_file)  # space freed: resume finishes the run
    assert train_here(tmp_path, resume=True, checkpoint_every=2).completed
    assert_same_run(tmp_path, reference)
