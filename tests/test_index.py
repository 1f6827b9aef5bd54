"""Index → search round trip on a folder of generated images: resume, bad files, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import blip2
from blip2.cli import main
from blip2.index import Index
from blip2.indexing import build_index
from factory import make_images


@pytest.fixture(scope="module")
def pipe(itm_ckpt):
    return blip2.load(itm_ckpt)


def _gallery(folder, n, start=0):
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(make_images(n, seed=100 + start)):
        img.save(folder / f"img{start + i:03d}.png")


def test_round_trip_resume_and_bad_files(pipe, itm_ckpt, tmp_path, capsys):
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 6)
    (photos / "sub").mkdir()
    make_images(1, seed=7)[0].save(photos / "sub" / "deep.jpg")
    (photos / "broken.png").write_bytes((photos / "img000.png").read_bytes()[:60])  # truncated
    (photos / "notes.txt").write_text("not an image")
    (photos / "fake.jpg").write_text("text pretending to be a jpeg")

    errors = []
    r = build_index(pipe, photos, out, model=str(itm_ckpt), batch_size=4, progress=False,
                    on_error=lambda p, m: errors.append(p))  # fmt: skip
    assert r.added == 7 and r.unchanged == 0
    assert sorted(errors) == ["broken.png", "fake.jpg"] and r.not_images == ["notes.txt"]
    index = Index.open(out)
    assert len(index) == 7 and index.embeddings().shape == (7, 4, 16)

    # an image of the gallery finds itself first, with cosine 1
    hits = pipe.search(photos / "img003.png", out, top=3)
    assert hits[0].path == "img003.png" and hits[0].score == pytest.approx(1.0, abs=2e-3)
    # a text query agrees with ITC computed directly
    text = "a red cube on the table."
    hits = pipe.search(text, out, top=7)
    paths = sorted(index.records, key=lambda p: index.records[p]["row"])
    itc = pipe.itc([photos / p for p in paths], text)[:, 0]
    want = [paths[i] for i in itc.argsort(descending=True).tolist()]
    assert [h.path for h in hits] == want
    assert hits[0].score == pytest.approx(float(itc.max()), abs=2e-3)  # float16 storage
    reranked = pipe.search(text, out, top=3, rerank=3)
    assert all(h.itm is not None for h in reranked)
    assert [h.itm for h in reranked] == sorted((h.itm for h in reranked), reverse=True)

    # resume: only new files are embedded; a removed file leaves the results
    _gallery(photos, 2, start=6)
    (photos / "img000.png").unlink()
    r = build_index(pipe, photos, out, model=str(itm_ckpt), progress=False)
    assert (r.added, r.unchanged, r.removed) == (2, 6, 1)
    index = Index.open(out)
    assert len(index) == 8 and index.stored_rows() == 9
    assert "img000.png" not in {h.path for h in pipe.search(text, out, top=20)}
    assert pipe.search(photos / "img007.png", out, top=1)[0].path == "img007.png"


def test_cli_index_and_search(itm_ckpt, tmp_path, capsys):
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 3)
    (photos / "bad.png").write_text("nope")
    assert main(["index", str(photos), "--model", str(itm_ckpt), "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "skipped bad.png" in err and "3 added" in err and "1 skipped" in err
    assert main(["index", str(photos), "--model", str(itm_ckpt), "--out", str(out), "-q"]) == 0
    assert "0 added, 3 unchanged" in capsys.readouterr().err

    assert main(["search", "a dog", "--index", str(out), "--top", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["score"] >= lines[1]["score"]
    assert main(["search", str(photos / "img001.png"), "--image", "--index", str(out), "--top", "1"]) == 0
    assert capsys.readouterr().out.split()[-1] == "img001.png"
    assert main(["search", "a dog", "--index", str(out), "--top", "2", "--rerank"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["search", "a dog", "--index", str(tmp_path / "nope")]) == 1


def test_cli_exact_reaches_the_model(itm_ckpt, tmp_path, capsys, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 2)
    seen = []
    real_load = blip2.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("exact"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(blip2, "load", spy)
    assert main(["index", str(photos), "--model", str(itm_ckpt), "--out", str(out), "-q", "--exact"]) == 0
    assert main(["search", "a dog", "--index", str(out), "--exact"]) == 0
    assert main(["search", "a dog", "--index", str(out)]) == 0
    assert seen == [True, True, False]


def test_faiss_path_matches_exact(pipe, itm_ckpt, tmp_path):
    pytest.importorskip("faiss")
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 12)
    build_index(pipe, photos, out, model=str(itm_ckpt), progress=False, ann="exact")
    index = Index.open(out)
    exact = index.search(index.embeddings()[5].astype("float32"), top=5)
    assert index.update_ann("faiss") == "faiss"
    index = Index.open(out)
    approx = index.search(index.embeddings()[5].astype("float32"), top=5, nprobe=1024)
    assert [h.path for h in approx] == [h.path for h in exact]


def _clustered(n, q=8, e=32, clusters=20, seed=0):
    """(n, q, e) float16 normalised embeddings: each image = a cluster centre + image noise, each of its
    query vectors = the image + query noise, so a query near one image has a meaningful top 5."""
    g = np.random.default_rng(seed)
    centres = g.standard_normal((clusters, e))
    images = centres[g.integers(clusters, size=n)] + 0.5 * g.standard_normal((n, e))
    x = images[:, None] + 0.5 * g.standard_normal((n, q, e))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)


def _records(start, n):
    return [{"path": f"img{start + i:05d}.png", "mtime_ns": 0, "size": 0} for i in range(n)]


def test_summary_search_matches_exact(tmp_path):
    emb = _clustered(600)
    index = Index.create(tmp_path / "idx", model="m", kind="itc", num_queries=8, dim=32, root=str(tmp_path))
    for start in range(0, 600, 128):
        index.append(emb[start : start + 128], _records(start, min(128, 600 - start)))
    index.remove(["img00007.png"])
    index = Index.open(tmp_path / "idx")
    assert index.summary().shape == (600, 32)
    g = np.random.default_rng(1)
    for row in g.choice(600, size=10, replace=False):
        text = emb[row, g.integers(8)].astype(np.float32)[None]  # one query vector of an image
        image = emb[row].astype(np.float32)  # all of them
        for qv in (text, image):
            exact = index.search(qv, top=5)
            approx = index.search(qv, top=5, exact_below=0, candidates=80)
            assert [h.path for h in approx] == [h.path for h in exact]
            assert [h.score for h in approx] == [h.score for h in exact]  # scored exactly
    assert "img00007.png" not in {h.path for h in index.search(emb[7, 0].astype(np.float32), 600,
                                                                exact_below=0, candidates=60)}  # fmt: skip


def test_summary_stays_consistent_on_crash_and_legacy(tmp_path):
    emb = _clustered(50)
    folder = tmp_path / "idx"
    index = Index.create(folder, model="m", kind="itc", num_queries=8, dim=32, root=str(tmp_path))
    index.append(emb[:30], _records(0, 30))
    want = index.summary().copy()
    # a crash after writing embeddings (and half a summary) but before the manifest lines
    with open(folder / "embeddings.f16", "ab") as f:
        f.write(emb[30:40].tobytes())
    with open(folder / "summary.f16", "ab") as f:
        f.write(b"\0" * 100)
    index = Index.open(folder)
    assert len(index) == 30
    index.truncate_to_manifest()
    assert index.stored_rows() == index.summary_rows() == 30
    np.testing.assert_array_equal(index.summary(), want)
    index.append(emb[30:], _records(30, 20))
    assert index.stored_rows() == index.summary_rows() == 50
    full = index.summary().copy()
    # an index from before summaries: the first search (or `blip2 index`) computes them from the embeddings
    (folder / "summary.f16").unlink()
    index = Index.open(folder)
    hits = index.search(emb[42, 3].astype(np.float32), top=3, exact_below=0, candidates=10)
    assert hits[0].path == "img00042.png"
    np.testing.assert_array_equal(index.summary(), full)
    assert index.update_ann("auto") == "exact"  # small: exact scan
    assert index.update_ann("exact") == "exact" and Index.open(folder).meta["ann"] == {"type": "exact"}
