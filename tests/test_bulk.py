"""blip2 bulk with the local engine: sources, rows equal to caption / ask / embed_images, resume after a
crash, bad input, and `blip2 index --from`. The Ray engine is tested in test_bulk_ray.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import blip2
from blip2.bulk import Task, job, read_output, run_bulk
from blip2.bulk.local import Decoders, ThreadTuner, _decode_job, _init_worker
from blip2.bulk.read import dense_embeddings
from blip2.bulk.sources import scan
from blip2.bulk.tasks import ModelInfo
from blip2.cli import main
from blip2.errors import InputError
from blip2.images import ImageProcessor
from blip2.index import Index
from blip2.shards import read_member
from factory import make_images

GEN = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """8 images (png, jpg, webp, one in a sub-folder), a hidden file, and three that cannot be read."""
    folder = tmp_path_factory.mktemp("photos")
    images = make_images(8, seed=5)
    for i, im in enumerate(images[:6]):
        im.save(folder / f"img{i}.png")
    (folder / "sub").mkdir()
    images[6].save(folder / "sub" / "deep.jpg")
    images[7].save(folder / "sub" / "w.webp")
    images[0].save(folder / ".hidden.png")
    (folder / "broken.png").write_bytes((folder / "img1.png").read_bytes()[:60])  # truncated
    (folder / "notes.txt").write_text("not an image")
    Image.new("1", (12_000, 8_000)).save(folder / "huge.png")  # 96 M pixels: over the bomb guard
    return folder


BAD = {"broken.png": "truncated", "notes.txt": "not an image", "huge.png": "pixels"}


def _keys(folder: Path) -> list[str]:
    """What a folder source lists: every non-hidden file, walked in sorted order."""
    names = [
        "broken.png",
        "huge.png",
        *(f"img{i}.png" for i in range(6)),
        "notes.txt",
        "sub/deep.jpg",
        "sub/w.webp",
    ]
    return [os.path.join(str(folder), n) for n in names]


def _captions(capsys, model, images, *flags) -> dict[str, str]:
    capsys.readouterr()
    assert main(["caption", *images, "-m", str(model), "--json", *flags]) == 0
    return {d["image"]: d["text"] for d in map(json.loads, capsys.readouterr().out.splitlines())}


def test_caption_rows_equal_caption_json_at_any_batch_size(opt_ckpt, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-m", str(opt_ckpt), "--prompt", "the red", *GEN, "--part-size", "4"]
    assert main(["bulk", "caption", str(photos), "-o", str(out), "--batch-size", "3", *args]) == 0
    err = capsys.readouterr().err
    assert "img/s" in err and "11 images" in err and "3 unreadable" in err  # the bar, then the summary
    rows = read_output(out).to_pylist()
    assert [r["key"] for r in rows] == _keys(photos)  # one row per file, in order, the hidden one left out
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    for r in rows:
        bad = BAD.get(Path(r["key"]).name)
        assert (r["error"] is None) == (bad is None) and (r["text"] is None) == (bad is not None)
        if bad:
            assert bad in r["error"] and "\n" not in r["error"]
    good = [r["key"] for r in rows if r["error"] is None]
    want = _captions(capsys, opt_ckpt, good, "--prompt", "the red", *GEN)
    assert {r["key"]: r["text"] for r in rows if r["error"] is None} == want
    assert len(set(want.values())) > 1  # the images differ, and so do their captions

    one = tmp_path / "one"
    assert (
        main(["bulk", "caption", str(photos), "-o", str(one), "--batch-size", "1", "--decoders", "2", *args])
        == 0
    )
    assert read_output(one).equals(read_output(out))


def test_ask_gives_a_row_per_image_and_question(opt_ckpt, photos, tmp_path):
    questions = ["what is it?", "which colour is the shape?"]
    task = Task.make("ask", questions=questions, max_new_tokens=5)
    s = run_bulk(
        task, str(photos / "sub"), tmp_path / "out", model=str(opt_ckpt), batch_size=2, progress=False
    )
    assert (s.inputs, s.images, s.errors) == (2, 2, 0)
    rows = read_output(tmp_path / "out").to_pylist()
    pipe = blip2.load(opt_ckpt)
    want = []
    for name in ("deep.jpg", "w.webp"):
        key = os.path.join(str(photos / "sub"), name)
        answers = pipe.ask(key, questions, max_new_tokens=5)
        want += [
            {"key": key, "question": q, "text": a, "error": None}
            for q, a in zip(questions, answers, strict=True)
        ]
    assert rows == want


def test_embed_equals_embed_images_then_index_from(itm_ckpt, photos, tmp_path, capsys):
    bulk = tmp_path / "bulk"
    assert (
        main(["bulk", "embed", str(photos), "-o", str(bulk), "-m", str(itm_ckpt), "--batch-size", "4", "-q"])
        == 0
    )
    table = read_output(bulk)
    data, missing = dense_embeddings(table.column("embedding"))
    keys = table.column("key").to_pylist()
    good = [k for k, m in zip(keys, missing, strict=True) if not m]
    assert len(good) == 8 and data.dtype == np.float16 and data.shape[1:] == (4, 16)
    pipe = blip2.load(itm_ckpt)
    want = pipe.embed_images(good, batch_size=4).half().numpy()
    np.testing.assert_array_equal(data[~missing], want)  # the same batches: bit for bit
    assert np.allclose(np.linalg.norm(data[~missing].astype(np.float32), axis=-1), 1, atol=2e-3)
    # other batches: float32 rounding (the fast CPU kernels depend on the row count) moves a float16 by
    # at most one step; with exact=True (the reference's kernel) they are equal whatever the batches
    np.testing.assert_allclose(data[~missing], pipe.embed_images(good).half().numpy(), rtol=2e-3, atol=1e-6)
    exact = tmp_path / "exact"
    assert main(["bulk", "embed", str(photos), "-o", str(exact), "-m", str(itm_ckpt), "--batch-size", "3",
                 "--exact", "-q"]) == 0  # fmt: skip
    got, _ = dense_embeddings(read_output(exact).column("embedding"))
    np.testing.assert_array_equal(
        got[~missing], blip2.load(itm_ckpt, exact=True).embed_images(good).half().numpy()
    )

    capsys.readouterr()
    idx = tmp_path / "idx"
    assert main(["index", "--from", str(bulk), "--out", str(idx)]) == 0
    assert "8 added, 0 unchanged, 3 unreadable" in capsys.readouterr().err
    index = Index.open(idx)
    assert len(index) == 8 and index.meta["kind"] == "itc"
    np.testing.assert_array_equal(np.asarray(index.embeddings()), want)
    hits = pipe.search(photos / "img3.png", idx, top=2)
    assert hits[0].path == str(photos / "img3.png") and hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert main(["index", "--from", str(bulk), "--out", str(idx)]) == 0  # again: nothing new
    assert "0 added, 8 unchanged" in capsys.readouterr().err


def test_resume_after_a_crash_writes_every_row_once(opt_ckpt, photos, tmp_path, monkeypatch):
    task = Task.make("caption", max_new_tokens=4)
    options = dict(model=str(opt_ckpt), batch_size=2, part_size=2, progress=False)
    run_bulk(task, str(photos), tmp_path / "whole", **options)
    whole = read_output(tmp_path / "whole")

    out = tmp_path / "out"
    calls = {"n": 0}
    real_run = Task.run

    def crash_on_third_batch(self, pipe, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(self, pipe, pixels)

    monkeypatch.setattr(Task, "run", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_bulk(task, str(photos), out, **options)
    monkeypatch.undo()
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert done and len(done) < 6
    assert not list(out.glob(".*.tmp"))  # the part being written when it stopped is not left behind
    # what a hard crash (power cut) could leave: a temporary file, and a damaged part (a copied folder)
    (out / ".part-00005.parquet.999.tmp").write_bytes(b"PAR1 half")
    first = out / done[0]
    first.write_bytes(first.read_bytes()[:40])

    s = run_bulk(task, str(photos), out, **options)
    assert s.done_before == 2 * (len(done) - 1) and s.images == 11 - s.done_before
    assert not list(out.glob(".*.tmp"))
    assert read_output(out).equals(whole)  # every row once, in order, the same as one uninterrupted run
    s = run_bulk(task, str(photos), out, **options)  # finished: nothing to do
    assert (s.done_before, s.images) == (11, 0)


def test_model_that_fails_to_load_keeps_what_was_written(opt_ckpt, photos, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(opt_ckpt, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    assert main(["bulk", "caption", str(photos), "-o", str(out), "-m", str(broken), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blip2: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (out / "_job.json").is_file() and (out / "_inputs.parquet").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["bulk", "caption", "{tmp}/nowhere", "-o", "{tmp}/o", "-m", "{ckpt}"], "no such file or folder"),
        (["bulk", "caption", "{tmp}/*.none", "-o", "{tmp}/o", "-m", "{ckpt}"], "no file matches"),
        (["bulk", "caption", "{photos}", "-o", "{tmp}/o", "-m", "{tmp}/nowhere"], "no such folder"),
        (["bulk", "caption", "{photos}", "-o", "{photos}", "-m", "{ckpt}"], "not a blip2 bulk output"),
        (
            ["bulk", "caption", "{photos}", "-o", "{tmp}/o", "-m", "{ckpt}", "--address", "x:1"],
            "--engine ray",
        ),
        (["bulk", "caption", "{photos}", "-o", "{tmp}/o", "-m", "{ckpt}", "--batch-size", "0"], "batch_size"),
        (
            [
                "bulk",
                "caption",
                "{photos}",
                "-o",
                "{tmp}/o",
                "-m",
                "{ckpt}",
                "--engine",
                "ray",
                "--address",
                "127.0.0.1:1",
            ],
            "cannot reach the Ray cluster at 127.0.0.1:1",
        ),  # fmt: skip
        (["index", "--from", "{tmp}", "--out", "{tmp}/idx"], "not a blip2 bulk output"),
    ],
)
def test_bad_input_is_one_line(opt_ckpt, photos, tmp_path, capsys, args, message):
    fill = {"tmp": str(tmp_path), "photos": str(photos), "ckpt": str(opt_ckpt)}
    assert main([a.format(**fill) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blip2: error:") and message in err and len(err.strip().splitlines()) == 1


def test_another_job_in_the_same_folder_is_refused(opt_ckpt, photos, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["bulk", "caption", str(photos / "sub"), "-o", out, "-m", str(opt_ckpt), "-q", *GEN]
    assert main(base) == 0
    assert main([*base, "--prompt", "a photo of"]) == 1
    assert "holds another job (task:" in capsys.readouterr().err
    assert main(["index", "--from", out, "--out", str(tmp_path / "idx")]) == 1
    assert "needs `bulk embed`" in capsys.readouterr().err


def test_sources(tmp_path):
    images = make_images(4, seed=9)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, im in zip(["a.png", "b.jpg", "c.webp", "d.png"], images, strict=True):
        im.save(folder / name)
    (tmp_path / "list.txt").write_text("imgs/a.png\n# a comment\n\nimgs/b.jpg\n")
    (tmp_path / "list.jsonl").write_text('{"image": "imgs/c.webp"}\n{"image": 3}\n')
    pq.write_table(pa.table({"image": ["imgs/d.png", "imgs/a.png"]}), tmp_path / "list.parquet")

    def keys(source):
        t = scan(source).table
        return t.column("key").to_pylist(), t.column("error").to_pylist(), t.column("path").to_pylist()

    k, e, p = keys(str(tmp_path / "list.txt"))
    assert k == ["imgs/a.png", "imgs/b.jpg"] and p == [str(folder / "a.png"), str(folder / "b.jpg")]
    k, e, _ = keys(str(tmp_path / "list.jsonl"))
    assert k == ["imgs/c.webp", "3"] and e[0] is None and "not a path" in e[1]
    assert keys(str(tmp_path / "list.parquet"))[0] == ["imgs/d.png", "imgs/a.png"]  # the list's order
    assert keys(str(folder / "*.png"))[0] == [str(folder / "a.png"), str(folder / "d.png")]
    assert keys(str(folder / "b.jpg"))[0] == [str(folder / "b.jpg")]

    # WebDataset shards: a sample is the members sharing a key; its image the jpg/png/webp one
    def shard(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    jpg = (folder / "b.jpg").read_bytes()
    shard(tmp_path / "s0.tar", [("0001.jpg", jpg), ("0001.txt", b"caption"), ("0002.json", b"{}"),
                                ("dir/0003.png", (folder / "a.png").read_bytes())])  # fmt: skip
    shard(tmp_path / "s1.tar", [("0004.cls", b"1"), ("0004.webp", (folder / "c.webp").read_bytes())])
    assert scan(str(tmp_path / "s{0..1}.tar")).table.equals(scan(str(tmp_path / "s*.tar")).table)
    t = scan(str(tmp_path / "s*.tar"))
    assert t.base is None
    assert t.table.column("key").to_pylist() == ["0001", "0002", "dir/0003", "0004"]
    errors = t.table.column("error").to_pylist()
    assert errors[0] is None and "no jpg/jpeg/png/webp image" in errors[1]
    row = t.table.slice(0, 1).to_pylist()[0]
    assert read_member(row["path"], row["offset"], row["size"]) == jpg

    for bad, message in [("nowhere", "no such file or folder"), ("empty", "no images found")]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(InputError, match=message):
            scan(str(tmp_path / bad))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(InputError, match="bad.jsonl:1: not a JSON line"):
        scan(str(tmp_path / "bad.jsonl"))


def test_webdataset_shard_rows(opt_ckpt, tmp_path, capsys):
    """Shard members are decoded from inside the tar; keys are the samples' keys."""
    images = make_images(3, seed=21)
    files = []
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, im in enumerate(images):
            path = tmp_path / f"{i:04d}.png"
            im.save(path)
            files.append(str(path))
            tar.add(path, arcname=path.name)
        info = tarfile.TarInfo("0003.jpg")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"junk!"))
    out = tmp_path / "out"
    assert (
        main(
            ["bulk", "caption", str(tmp_path / "shard.tar"), "-o", str(out), "-m", str(opt_ckpt), "-q", *GEN]
        )
        == 0
    )
    rows = read_output(out).to_pylist()
    assert [r["key"] for r in rows] == ["0000", "0001", "0002", "0003"]
    assert rows[3]["text"] is None and "not an image" in rows[3]["error"]
    want = _captions(capsys, opt_ckpt, files, *GEN)
    assert [r["text"] for r in rows[:3]] == [want[f] for f in files]


@dataclasses.dataclass(frozen=True)
class CrashOn33Wide(ImageProcessor):
    """Ends its process on an image 33 pixels wide, as a crash inside the image library would."""

    def preprocess(self, image):
        if image.width == 33:
            os._exit(3)
        return super().preprocess(image)


def test_a_file_that_kills_its_decoder_is_an_error_row(opt_ckpt, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_images(5, seed=3)):
        im.save(folder / f"img{i}.png")
    make_images(1, size=33, seed=4)[0].save(folder / "img2x.png")  # between img2 and img3
    describe = job.describe

    def crashing(model):
        info = describe(model)
        fields = {f.name: getattr(info.image_processor, f.name) for f in dataclasses.fields(ImageProcessor)}
        return ModelInfo(CrashOn33Wide(**fields), info.embedding)

    monkeypatch.setattr(job, "describe", crashing)
    task = Task.make("caption", max_new_tokens=3)
    s = run_bulk(task, str(folder), tmp_path / "out", model=str(opt_ckpt), batch_size=2, progress=False)
    assert (s.images, s.errors) == (6, 1)
    rows = read_output(tmp_path / "out").to_pylist()
    assert [r["error"] for r in rows] == [None, None, None, Decoders.CRASHED, None, None]
    assert all(isinstance(r["text"], str) for r in rows if r["error"] is None)


def test_load_options_reach_the_model(opt_ckpt, photos, tmp_path, monkeypatch):
    seen = {}
    load = blip2.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(blip2, "load", spy)
    out = tmp_path / "out"
    args = ["-m", str(opt_ckpt), "--quantize", "int8", "--device", "cpu", "--max-new-tokens", "3", "-q"]
    assert main(["bulk", "caption", str(photos / "sub"), "-o", str(out), *args]) == 0
    assert seen == {"device": "cpu", "dtype": None, "quantize": "int8", "exact": False}
    assert json.loads((out / "_job.json").read_text())["quantize"] == "int8"


@pytest.mark.parametrize(
    ("decode_ms", "model_ms", "chosen"),
    [(5.0, 1.0, 1), (5.0, 100.0, 2)],  # decoding most of the work: the lean setting; a minor part: every core
)
def test_thread_tuner_gives_the_cores_to_the_larger_share(decode_ms, model_ms, chosen):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tuner = ThreadTuner(decoders=2)
        assert tuner.threads is None and tuner.lean == 1
        for _ in range(2):  # the warm-up batch on every core, then one lean
            tuner.decoded(16, 16 * decode_ms / 1000)
            tuner.batch_done(16, 16 * model_ms / 1000)
            if tuner.threads is not None:
                break
        assert tuner.threads == chosen and torch.get_num_threads() == chosen
        tuner.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_decode_job_raises_its_workers_niceness_only(photos):
    """A decode job runs at the niceness it is sent with or more (a worker never lowers its own)."""
    import multiprocessing

    def worker(queue) -> None:  # in a process of its own, to renice
        _init_worker(ImageProcessor(size=(32, 32)))
        seen = []
        for nice in (3, 0):
            results, _ = _decode_job([(str(photos / "img0.png"), -1, -1, None)], nice)
            seen.append((results[0][0].shape, os.getpriority(os.PRIO_PROCESS, 0)))
        queue.put(seen)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=worker, args=(queue,))
    process.start()
    seen = queue.get(timeout=60)
    process.join()
    start = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen == [((3, 32, 32), max(3, start)), ((3, 32, 32), max(3, start))]


@dataclasses.dataclass(frozen=True)
class CountingProcessor(ImageProcessor):
    """Notes each image it preprocesses in ``log`` (one line each, from any decode process)."""

    log: str = ""

    def preprocess(self, image):
        with open(self.log, "a") as f:
            f.write("x\n")
        return super().preprocess(image)


def test_decoding_goes_on_while_the_model_loads(opt_ckpt, tmp_path, monkeypatch):
    """The decoders do not stop at the window's size (40 images here) while the model loads: the load
    below waits for all 64 images to be decoded (a window that stops early would only time out)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_images(4, seed=6) * 16):
        im.save(folder / f"img{i:02d}.png")
    log = tmp_path / "decoded"
    describe, load = job.describe, job._load

    def counting(model):
        info = describe(model)
        fields = {f.name: getattr(info.image_processor, f.name) for f in dataclasses.fields(ImageProcessor)}
        return ModelInfo(CountingProcessor(**fields, log=str(log)), info.embedding)

    decoded_by_load = []

    def slow_load(*args):
        for _ in range(600):  # at most a minute
            n = len(log.read_text().split()) if log.exists() else 0
            if n == 64:
                break
            time.sleep(0.1)
        decoded_by_load.append(n)
        return load(*args)

    monkeypatch.setattr(job, "describe", counting)
    monkeypatch.setattr(job, "_load", slow_load)
    task = Task.make("caption", max_new_tokens=3)
    s = run_bulk(task, str(folder), tmp_path / "out", model=str(opt_ckpt), batch_size=2, decoders=2,
                 progress=False)  # fmt: skip
    assert decoded_by_load == [64] and (s.images, s.errors) == (64, 0)
    assert len(log.read_text().split()) == 64  # each image decoded once
    rows = read_output(tmp_path / "out").to_pylist()
    assert [r["key"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    assert all(isinstance(r["text"], str) for r in rows)
