"""The `blip2` command, run in-process (and once as `python -m blip2`)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import weakref

import pytest

import blip2
from blip2.cli import main
from factory import make_images


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, im in enumerate(make_images(3, 28, seed=31)):
        paths.append(str(folder / f"img{i}.png"))
        im.save(paths[-1])
    return paths


def test_caption_json(opt_ckpt, image_files, capsys):
    rc = main(
        [
            "caption",
            *image_files,
            "--model",
            str(opt_ckpt),
            "--json",
            "--max-new-tokens",
            "5",
            "--prompt",
            "the red",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [d["image"] for d in lines] == image_files
    want = blip2.load(opt_ckpt).caption(image_files, prompt="the red", max_new_tokens=5)
    assert [d["text"] for d in lines] == want


def test_caption_batches_and_progress(t5_ckpt, image_files, capsys):
    rc = main(
        [
            "caption",
            *image_files,
            "-m",
            str(t5_ckpt),
            "--batch-size",
            "2",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "4",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    rows = [line.split("\t") for line in out.out.splitlines()]
    assert [r[0] for r in rows] == image_files
    want = blip2.load(t5_ckpt).caption(image_files, num_beams=2, max_new_tokens=4)
    assert [r[1] for r in rows] == want
    assert "image" in out.err  # the tqdm bar


def test_caption_bad_images_reported_good_ones_captioned(opt_ckpt, image_files, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    missing = str(tmp_path / "missing.png")
    rc = main(
        [
            "caption",
            image_files[0],
            str(bad),
            missing,
            image_files[1],
            "-m",
            str(opt_ckpt),
            "--json",
            "--max-new-tokens",
            "3",
        ]
    )
    out = capsys.readouterr()
    assert rc == 1
    assert [json.loads(line)["image"] for line in out.out.splitlines()] == image_files[:2]
    err = out.err.splitlines()
    assert any(str(bad) in line and "not an image" in line for line in err)
    assert any(missing in line and "no such file" in line for line in err)
    assert all(line.startswith("blip2: error:") for line in err)
    assert "Traceback" not in out.err


def test_caption_streams_batches_in_bounded_memory(opt_ckpt, image_files, tmp_path, capsys, monkeypatch):
    import blip2.images as images
    from blip2.api import Pipeline

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    paths = [*image_files * 2, str(bad), *image_files * 2]  # 13 paths, one unreadable
    alive, peak, loads_at_first_caption = set(), [0], []
    real_load, real_caption = images.load_image, Pipeline.caption

    def tracked_load(source, **kwargs):
        img = real_load(source, **kwargs)
        if not isinstance(source, str):  # the model's own conversion of an image already read
            return img
        alive.add(id(img))
        weakref.finalize(img, alive.discard, id(img))
        peak[0] = max(peak[0], len(alive))
        return img

    def tracked_caption(self, *args, **kwargs):
        if not loads_at_first_caption:
            loads_at_first_caption.append(len(alive))
        return real_caption(self, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", tracked_load)
    monkeypatch.setattr(Pipeline, "caption", tracked_caption)
    rc = main(
        ["caption", *paths, "-m", str(opt_ckpt), "--batch-size", "4", "--max-new-tokens", "3", "--json"]
    )
    out = capsys.readouterr()
    assert rc == 1
    assert peak[0] <= 4 and loads_at_first_caption == [4]  # one batch decoded at a time
    lines = [json.loads(line) for line in out.out.splitlines()]
    good = [p for p in paths if p != str(bad)]
    assert [d["image"] for d in lines] == good
    monkeypatch.undo()
    want = dict(zip(image_files, blip2.load(opt_ckpt).caption(image_files, max_new_tokens=3), strict=True))
    assert [d["text"] for d in lines] == [want[p] for p in good]
    err = [line for line in out.err.splitlines() if line.startswith("blip2: error:")]
    assert len(err) == 2 and str(bad) in err[0] and "1 of 13 images could not be read" in err[1]


def test_ask(t5_ckpt, image_files, capsys):
    rc = main(
        ["ask", image_files[0], "what colour is the ball?", "-m", str(t5_ckpt), "--max-new-tokens", "5"]
    )
    out = capsys.readouterr()
    assert rc == 0
    want = blip2.load(t5_ckpt).ask(image_files[0], "what colour is the ball?", max_new_tokens=5)
    assert out.out == want + "\n"


def test_ask_several_questions(opt_ckpt, image_files, capsys):
    questions = ["what colour is the ball?", "how many dogs are there?"]
    rc = main(["ask", image_files[0], *questions, "-m", str(opt_ckpt), "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr()
    assert rc == 0
    m = blip2.load(opt_ckpt)
    want = [m.ask(image_files[0], q, max_new_tokens=4) for q in questions]
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["question"] for r in rows] == questions
    assert [r["text"] for r in rows] == want


def test_chat_streams_replies(t5_ckpt, image_files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is this?\n\n/reset\nwhat is this?\n/quit\nignored\n"))
    rc = main(["chat", image_files[0], "-m", str(t5_ckpt), "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert rc == 0
    lines = out.out.splitlines()
    want = blip2.load(t5_ckpt).ask(image_files[0], "what is this?", max_new_tokens=5)
    assert lines == [want, want]  # after /reset the same question gets the same answer


@pytest.mark.parametrize(
    "args, message",
    [
        (["caption", "{img}", "-m", "{nowhere}"], "no such folder"),
        (["ask", "{missing}", "what?", "-m", "{ckpt}"], "no such file"),
        (["ask", "{img}", "x " * 300, "-m", "{ckpt}"], "tokens long"),
        (["caption", "{img}", "-m", "{ckpt}", "--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_errors_are_one_line(opt_ckpt, image_files, tmp_path, capsys, args, message):
    fill = {
        "img": image_files[0],
        "nowhere": str(tmp_path / "nowhere"),
        "missing": str(tmp_path / "m.png"),
        "ckpt": str(opt_ckpt),
    }
    rc = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("blip2: error:") and message in err and len(err.strip().splitlines()) == 1


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["caption"])
    assert e.value.code == 2


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "blip2", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert all(cmd in proc.stdout for cmd in ("caption", "ask", "chat"))


@pytest.mark.parametrize(
    "flags", [["--quantize", "int8"], ["--quantize", "int4", "--group-size", "256"], ["--exact"]]
)
def test_load_options_reach_the_model(opt_ckpt, image_files, monkeypatch, flags):
    seen = {}
    real_load = blip2.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(blip2, "load", spy)
    rc = main(["caption", image_files[0], "-m", str(opt_ckpt), "--max-new-tokens", "3", *flags])
    assert rc == 0
    assert seen["quantize"] == (flags[1] if "--quantize" in flags else None)
    assert seen["group_size"] == (256 if "--group-size" in flags else None)
    assert seen["exact"] is ("--exact" in flags)
