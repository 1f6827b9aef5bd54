"""blip2 bulk on a real local Ray cluster (2 CPUs, started once for the module): the same rows as the local
engine, a model actor killed mid-job losing nothing, a model that cannot load on a worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip2.bulk import Task, read_output, run_bulk
from blip2.bulk.ray_engine import RAY_ENV
from blip2.errors import CheckpointError
from factory import make_images

if os.environ.get("CI"):
    import ray  # CI must test the Ray engine: a missing ray is a failure there (`bash tests/setup.sh`)
else:
    ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra (in dev)")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs; its GCS address lets other processes join it (``--address``)."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, im in enumerate(make_images(100, seed=11)):
        im.save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes((folder / "img00.png").read_bytes()[:50])
    (folder / "notes.txt").write_text("not an image")
    return folder


CAPTION = Task.make("caption", prompt="the red", max_new_tokens=5)


@pytest.fixture(scope="module")
def local_rows(opt_ckpt, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    run_bulk(CAPTION, str(photos), out, model=str(opt_ckpt), batch_size=4, part_size=8, progress=False)
    return read_output(out)


def test_ray_engine_writes_what_the_local_engine_writes(cluster, opt_ckpt, photos, local_rows, tmp_path):
    out = tmp_path / "out"
    s = run_bulk(CAPTION, str(photos), out, model=str(opt_ckpt), batch_size=3, part_size=8, engine="ray",
                 workers=2, progress=False)  # fmt: skip
    assert (s.inputs, s.images, s.errors) == (102, 102, 2)
    got = read_output(out)
    assert got.equals(local_rows)  # every row once, in order, each caption the same
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:05d}.parquet" for i in range(13)]


def _model_actors() -> list[dict]:
    from ray._private import state  # the GCS actor table: works without the dashboard

    return [a for a in state.actors().values()
            if "ModelWorker" in a["ActorClassName"] and a["State"] == "ALIVE"]  # fmt: skip


def test_model_actor_killed_mid_job_loses_nothing(cluster, opt_ckpt, photos, local_rows, tmp_path):
    """`blip2 bulk --engine ray --address` joins the cluster; its one model actor's process is killed once
    a part is written; Ray restarts it and re-runs its batch, and the output has every row exactly once."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "blip2", "bulk", "caption", str(photos), "-o", str(out), "-m", str(opt_ckpt),
               "--prompt", "the red", "--max-new-tokens", "5", "--batch-size", "1", "--part-size", "8",
               "--engine", "ray", "--address", cluster, "--workers", "1", "-q"]  # fmt: skip
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.parquet")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        actors = _model_actors()
        assert job.poll() is None, "the job ended before the actor could be killed: " + job.communicate()[1]
        assert len(actors) == 1
        os.kill(actors[0]["Pid"], signal.SIGKILL)
        parts_at_kill = len(list(out.glob("part-*.parquet")))
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    assert parts_at_kill < 13  # the kill came mid-job
    from ray._private import state

    assert state.actors(actor_id=actors[0]["ActorID"])["NumRestarts"] >= 1  # Ray restarted it
    assert read_output(out).equals(local_rows)


def test_ask_and_embed_on_ray_equal_the_local_engine(cluster, opt_ckpt, itm_ckpt, photos, tmp_path):
    ask = Task.make("ask", questions=["what is it?", "which colour?"], max_new_tokens=4)
    for task, model in ((ask, opt_ckpt), (Task.make("embed"), itm_ckpt)):
        options = dict(model=str(model), batch_size=4, part_size=16, progress=False, exact=True)
        run_bulk(task, str(photos), tmp_path / f"{task.verb}-local", **options)
        run_bulk(task, str(photos), tmp_path / f"{task.verb}-ray", engine="ray", workers=2, **options)
        assert read_output(tmp_path / f"{task.verb}-ray").equals(read_output(tmp_path / f"{task.verb}-local"))


def test_model_that_fails_to_load_on_a_worker(cluster, opt_ckpt, photos, tmp_path):
    # last of the cluster's jobs: on a loaded 2-core machine the job started right after it waited for
    # good in Ray Data's from_arrow (the failed pool's actors still holding the cluster's CPUs, it seems)
    broken = tmp_path / "broken"
    shutil.copytree(opt_ckpt, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # config and processor fine: it fails on the worker
    with pytest.raises(CheckpointError, match="the model failed on a Ray worker"):
        run_bulk(CAPTION, str(photos), tmp_path / "out", model=str(broken), engine="ray", progress=False)
    assert (tmp_path / "out" / "_job.json").is_file()


def test_without_an_address_a_local_runtime_is_started(opt_ckpt, photos, local_rows, tmp_path):
    """The command alone (no --address): it starts a Ray runtime of its own, and stops it."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "blip2", "bulk", "caption", str(photos), "-o", str(out), "-m", str(opt_ckpt),
               "--prompt", "the red", "--max-new-tokens", "5", "--part-size", "8", "--engine", "ray", "--workers", "2"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stderr and "102 images" in proc.stderr
    assert read_output(out).equals(local_rows)
