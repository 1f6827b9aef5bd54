"""Index → search round trip on a folder of generated images: resume, bad files, the CLI; surviving
the file system (vanishing files, links, crafted rows), reclaiming dead rows, the write lock, FAISS."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import blip2
from blip2.cli import main
from blip2.index import Index, write_lock
from blip2.indexing import build_index
from blip2.locking import FolderBusyError
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
    assert len(index) == 8 and index.stored_rows() == 8 and r.reclaimed == 1  # compacted
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
    # faiss-cpu is in the dev extra: this runs (and fails if FAISS is missing), never skips
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


# ---- the file system moves under the index -------------------------------------------------------------


def test_links_and_files_vanishing_mid_walk_are_reported_not_fatal(pipe, itm_ckpt, tmp_path, monkeypatch):
    import blip2.indexing as indexing

    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 4)
    make_images(1, seed=9)[0].save(tmp_path / "outside.png")
    (photos / "ghost.png").symlink_to(photos / "nowhere.png")  # dangling
    (photos / "escape.png").symlink_to(tmp_path / "outside.png")  # a link out of the folder
    (photos / "alias.png").symlink_to(photos / "img000.png")  # a link that stays inside: indexed
    (photos / "sub").mkdir()
    make_images(1, seed=8)[0].save(photos / "sub" / "deep.png")
    errors = {}
    r = build_index(pipe, photos, out, model=str(itm_ckpt), progress=False,
                    on_error=lambda p, m: errors.__setitem__(p, m))  # fmt: skip
    assert r.added == 6 and set(errors) == {"ghost.png", "escape.png"}
    assert "missing file" in errors["ghost.png"] and "out of the indexed folder" in errors["escape.png"]

    # a file deleted between the walk and its stat: reported, the rest goes on, its old rows dropped
    real_scan = indexing.scan_images

    def scan_then_delete(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        (photos / "img002.png").unlink()
        return found

    monkeypatch.setattr(indexing, "scan_images", scan_then_delete)
    # and a folder that cannot be listed this time: reported, what was indexed in it kept
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": _raise(PermissionError(13, "Permission denied", str(p)))
                        if str(p).endswith("sub") else real_scandir(p))  # fmt: skip
    _gallery(photos, 1, start=4)
    errors.clear()
    r = build_index(pipe, photos, out, model=str(itm_ckpt), progress=False,
                    on_error=lambda p, m: errors.__setitem__(p, m))  # fmt: skip
    assert (r.added, r.removed) == (1, 1) and set(errors) == {"img002.png", "sub", "ghost.png", "escape.png"}
    assert "cannot list the folder" in errors["sub"]
    assert sorted(Index.open(out).records) == ["alias.png", "img000.png", "img001.png", "img003.png",
                                                "img004.png", "sub/deep.png"]  # fmt: skip


def _raise(error):
    raise error


def test_rerank_stays_inside_the_root_and_survives_a_missing_file(pipe, itm_ckpt, tmp_path, monkeypatch,
                                                                  caplog):  # fmt: skip
    import blip2.images as images

    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 4)
    build_index(pipe, photos, out, model=str(itm_ckpt), progress=False)
    secret = tmp_path / "secret.png"
    make_images(1, seed=5)[0].save(secret)
    (photos / "link.png").symlink_to(secret)
    index = Index.open(out)
    crafted = ["../secret.png", str(secret), "link.png", "sub/../../secret.png"]
    index.append(pipe.embed_images([secret] * len(crafted)).numpy(),
                 [{"path": p, "mtime_ns": 0, "size": 0} for p in crafted])  # fmt: skip
    (photos / "img001.png").unlink()  # deleted since indexing

    opened = []
    real_open = images._open_file
    monkeypatch.setattr(images, "_open_file", lambda path, mp: opened.append(path) or real_open(path, mp))
    with caplog.at_level(logging.WARNING, logger="blip2.indexing"):
        hits = pipe.search("a red cube", out, top=20, rerank=-1)
    assert sorted(h.path for h in hits) == ["img000.png", "img002.png", "img003.png"]
    assert all(h.itm is not None for h in hits)
    assert [h.itm for h in hits] == sorted((h.itm for h in hits), reverse=True)
    assert opened and all(p.resolve().is_relative_to(photos.resolve()) for p in opened)
    warned = [r.getMessage() for r in caplog.records]
    assert sum("outside the indexed folder" in w for w in warned) == len(crafted)
    assert any("img001.png" in w and "no such file" in w for w in warned)
    # without re-ranking nothing is opened and every row answers
    opened.clear()
    assert len(pipe.search("a red cube", out, top=20)) == 8 and not opened


def _storage(folder):
    index = Index.open(folder)
    manifest = index.file("manifest.jsonl").read_text().splitlines()
    return index, index.file("embeddings.f16").stat().st_size // index.row_bytes, len(manifest)


def test_removed_and_changed_files_are_reclaimed(pipe, itm_ckpt, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 10)
    build_index(pipe, photos, out, model=str(itm_ckpt), progress=False)
    text = "a small green ball"
    before = {h.path: h.score for h in pipe.search(text, out, top=10)}

    for i in range(0, 10, 2):
        (photos / f"img{i:03d}.png").unlink()
    r = build_index(pipe, photos, out, model=str(itm_ckpt), progress=False)
    assert (r.removed, r.reclaimed) == (5, 5)
    index, rows, lines = _storage(out)
    assert len(index) == rows == lines == index.stored_rows() == index.summary_rows() == 5
    after = pipe.search(text, out, top=10)
    assert [h.path for h in after] == [p for p in before if p in index.records]
    assert [h.score for h in after] == pytest.approx([before[h.path] for h in after], abs=1e-6)

    for rnd in range(3):  # change two files a few times: storage stays at the live count
        for j, img in enumerate(make_images(2, seed=50 + rnd)):
            img.save(photos / f"img{2 * j + 1:03d}.png")
            os.utime(photos / f"img{2 * j + 1:03d}.png", ns=(rnd + 1, rnd + 1))  # a new mtime for sure
        r = build_index(pipe, photos, out, model=str(itm_ckpt), progress=False)
        assert (r.added, r.unchanged, r.reclaimed) == (2, 3, 2)
        index, rows, lines = _storage(out)
        assert len(index) == rows == lines == 5
        assert pipe.search(photos / "img003.png", out, top=1)[0].score == pytest.approx(1.0, abs=2e-3)
    # only the live generation's files are left
    names = {f.name for f in out.iterdir()}
    gen = index.generation
    assert names == {
        "meta.json",
        "lock",
        f"embeddings.{gen}.f16",
        f"summary.{gen}.f16",
        f"manifest.{gen}.jsonl",
    }


def test_compaction_is_crash_safe_and_reads_old_folders(tmp_path, monkeypatch):
    emb = _clustered(40)
    folder = tmp_path / "idx"
    index = Index.create(folder, model="m", kind="itc", num_queries=8, dim=32, root=str(tmp_path))
    index.append(emb, _records(0, 40))
    index.meta["format"] = 1  # a folder written before generations existed
    index.save_meta()
    index = Index.open(folder)
    index.remove([f"img{i:05d}.png" for i in range(0, 40, 4)])
    query = emb[5, 2].astype(np.float32)
    want = [(h.path, h.score) for h in index.search(query, top=40)]
    assert index.wants_compaction()

    def crash(self):
        raise OSError("disk full")

    monkeypatch.setattr(Index, "save_meta", crash)
    with pytest.raises(OSError):
        index.compact()  # new files written, never switched to
    monkeypatch.undo()
    reader = Index.open(folder)  # the old generation is whole
    assert reader.generation == 0 and [(h.path, h.score) for h in reader.search(query, top=40)] == want
    writer = Index.open(folder)
    assert writer.compact() == 10 and writer.stored_rows() == 30
    assert Index.open(folder).meta["format"] == 2
    assert {f.name for f in folder.iterdir()} == {"meta.json", "embeddings.1.f16", "summary.1.f16",
                                                  "manifest.1.jsonl"}  # fmt: skip
    # a reader opened before the compaction follows it (its old files are gone)
    assert [(h.path, h.score) for h in reader.search(query, top=40)] == want


# ---- one writer at a time ----------------------------------------------------------------------------

HOLD = """
import sys
from blip2.index import write_lock
with write_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_index_run_is_refused_at_once(itm_ckpt, tmp_path, capsys):
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _gallery(photos, 2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=os.environ)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["index", str(photos), "--model", str(itm_ckpt), "--out", str(out), "-q"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and "another `blip2 index`" in err[0]
        assert f"pid {holder.pid}" in err[0] and not (out / "meta.json").exists()
    finally:
        holder.communicate("")
    assert main(["index", str(photos), "--model", str(itm_ckpt), "--out", str(out), "-q"]) == 0
    assert "2 added" in capsys.readouterr().err


def test_write_lock_is_reentrant_in_a_thread_and_refused_by_another(tmp_path):
    refused = []

    def other():
        try:
            with write_lock(tmp_path / "idx"):
                pass
        except FolderBusyError as e:
            refused.append(str(e))

    with write_lock(tmp_path / "idx"), write_lock(tmp_path / "idx"):  # re-entrant
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(refused) == 1 and "another `blip2 index`" in refused[0]
    other()  # released: free for anyone
    assert len(refused) == 1


# ---- FAISS (faiss-cpu is in the dev extra) --------------------------------------------------------------


def test_faiss_follows_the_index_through_emptiness_growth_and_compaction(tmp_path):
    folder = tmp_path / "idx"
    index = Index.create(folder, model="m", kind="itc", num_queries=8, dim=32, root=str(tmp_path))
    assert index.update_ann("faiss") == "exact"  # nothing to train on yet; FAISS comes with the rows
    emb = _clustered(2400, seed=3)
    index.append(emb[:600], _records(0, 600))
    assert index.update_ann("auto") == "faiss"
    first = index.meta["ann"]
    assert first["rows"] == 600 and (folder / "ann.faiss").exists()

    def agrees(index, rows):
        index = Index.open(folder)
        for row in rows:
            q = emb[row].astype(np.float32)
            approx = [h.path for h in index.search(q, top=5, nprobe=1024)]
            index.meta["ann"], saved = {"type": "exact"}, index.meta["ann"]
            exact = [h.path for h in index.search(q, top=5)]
            index.meta["ann"] = saved
            assert approx == exact and approx[0] == f"img{row:05d}.png"

    agrees(index, [3, 301, 599])
    index.remove([f"img{i:05d}.png" for i in range(0, 600, 2)])
    assert index.compact() == 300 and index.meta["ann"]["rows"] == 0
    assert index.update_ann("auto") == "faiss" and index.meta["ann"]["rows"] == 300  # rebuilt, new rows
    agrees(index, [1, 301, 599])
    index.append(emb[600:], _records(600, 1800))  # 4x the vectors: more inverted lists, retrained
    assert index.update_ann("auto") == "faiss"
    assert index.meta["ann"]["rows"] == 2100 and index.meta["ann"]["factory"] != first["factory"]
    agrees(index, [5, 1234, 2399])
