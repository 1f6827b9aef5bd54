"""Move the model definitions into src/blip2/models/ (language models in models/language/) and rewrite every import (run from the repo root, then ruff check --fix and ruff format). Passed the whole suite on a clone of main during session 5; not applied then (branches were still merging)."""

import re
import subprocess
from pathlib import Path

MOVES = {  # old module (under blip2) -> new module (under blip2)
    "config": "models.config",
    "layers": "models.layers",
    "vision": "models.vision",
    "qformer": "models.qformer",
    "opt": "models.language.opt",
    "t5": "models.language.t5",
    "llama": "models.language.llama",
    "model": "models.blip2",
    "weights": "models.weights",
}


def path_of(mod: str) -> Path:
    return Path("src/blip2") / (mod.replace(".", "/") + ".py")


def module_of(path: Path) -> str:
    rel = path.relative_to("src").with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def main():
    Path("src/blip2/models/language").mkdir(parents=True, exist_ok=True)
    for old, new in MOVES.items():
        subprocess.run(["git", "mv", str(path_of(old)), str(path_of(new))], check=True)
    Path("src/blip2/models/__init__.py").write_text(
        '"""The model definitions, as the architecture runs: ``vision`` (EVA ViT) -> ``qformer`` (queries reading\n'
        "the image, and for InstructBLIP the prompt) -> the projection and composition in ``blip2`` -> a language\n"
        "model in ``language/`` (OPT, Flan-T5, LLaMA). ``config`` reads ``config.json``; ``layers`` holds the shared\n"
        'primitives; ``weights`` is the one place where the hub\'s tensor names appear."""\n'
    )
    Path("src/blip2/models/language/__init__.py").write_text(
        '"""The language models the image prefix feeds: OPT and LLaMA (decoder-only), Flan-T5 (encoder-decoder)."""\n'
    )
    subprocess.run(["git", "add", "src/blip2/models"], check=True)
    full = {f"blip2.{o}": f"blip2.{n}" for o, n in MOVES.items()}
    files = [p for p in Path(".").rglob("*.py") if ".git" not in p.parts and "checkpoints" not in p.parts]
    old_module = {module_of(path_of(n)): f"blip2.{o}" for o, n in MOVES.items()}
    for p in files:
        text = p.read_text()
        orig = text
        # absolute references: blip2.config -> blip2.models.config (imports, monkeypatch strings, -m)
        for o, n in full.items():
            text = re.sub(rf"\b{re.escape(o)}\b(?!\.py)", n, text)

        # `from blip2 import layers, native`: moved names get an import line of their own
        def split(m):
            indent, names = m.group(1), [n.strip() for n in m.group(2).split(",")]
            kept = [n for n in names if n not in MOVES]
            lines = [f"{indent}from blip2 import {', '.join(kept)}"] if kept else []
            for n in names:
                if n in MOVES:
                    parent, leaf = f"blip2.{MOVES[n]}".rsplit(".", 1)
                    lines.append(
                        f"{indent}from {parent} import {leaf} as {n}"
                        if leaf != n
                        else f"{indent}from {parent} import {n}"
                    )
            return "\n".join(lines)

        text = re.sub(r"^([ \t]*)from blip2 import ([\w, ]+)$", split, text, flags=re.M)
        # relative imports inside the package
        if p.parts[0] == "src":
            here = module_of(p)
            pkg = here if p.name == "__init__.py" else here.rsplit(".", 1)[0]
            was = old_module.get(here, here)  # relative imports were written from the old place
            old_pkg = was if p.name == "__init__.py" else was.rsplit(".", 1)[0]

            def fix(m, pkg=pkg, old_pkg=old_pkg):
                dots, name = m.group(1), m.group(2)
                base = pkg.split(".")
                old_base = old_pkg.split(".")
                up = len(dots) - 1
                target_pkg = old_base[: len(old_base) - up] if up else old_base
                absolute = ".".join(target_pkg + ([name] if name else []))
                # map through moves
                for o, n in full.items():
                    if absolute == o or absolute.startswith(o + "."):
                        absolute = n + absolute[len(o) :]
                        break
                # re-relativise against pkg
                a, b = absolute.split("."), base
                common = 0
                while common < min(len(a), len(b)) and a[common] == b[common]:
                    common += 1
                rel = "." * (len(b) - common + 1) + ".".join(a[common:])
                return f"from {rel} import"

            text = re.sub(r"from (\.+)([\w.]*) import", fix, text)
        if p.as_posix() == "src/blip2/models/weights.py":  # shipped checkpoints live beside the package root
            text = text.replace(
                "folder = Path(__file__).parent / named", "folder = Path(__file__).parent.parent / named"
            )
        if text != orig:
            p.write_text(text)


if __name__ == "__main__":
    main()
