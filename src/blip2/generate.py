"""Text generation over the language model: a static KV cache, greedy / sampling / beam search.

Shapes: ``B`` batch, ``K`` beams, ``T`` prompt positions, ``V`` vocabulary, ``N`` new tokens.

The pieces, gpt-fast style:

- a *runner* per language model (:class:`OPTRunner`, :class:`T5Runner`) owns the static cache and
  turns "prefill the prompt" and "one more token per row" into next-token logits ``(B, V)``;
- :func:`token_steps` is the greedy / sampling loop, an iterator of each step's B new tokens (streaming);
- :func:`beam_search` follows the reference's vectorised beam search step for step (same scores,
  length penalty, ``early_stopping`` True / False / ``"never"``, same kept hypotheses);
- :func:`generate_ids` puts them together and returns each row's continuation (EOS included when
  one was produced, nothing after it).

Logits processors run in the reference's order: repetition penalty, minimum new tokens (EOS
suppressed), then, when sampling, temperature, top-k, top-p. The penalty covers the prompt's own
token ids (left padding excluded), as the reference's does for decoder-only models; for T5 it covers
the decoder's tokens (start token included).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CheckpointError, InputError
from .json_fields import JsonFields, is_integer
from .models.language.opt import OPT
from .models.language.t5 import T5

log = logging.getLogger(__name__)

NEG = -1.0e9  # the reference's "never choose this" score in beam search


# ============================================================================ settings


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``generation_config.json`` of a checkpoint gives the defaults; call arguments win."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def from_file(cls, path: str | Path, **defaults: Any) -> GenerationConfig:
        """Read the keys we know from ``generation_config.json`` (absent file: ``defaults`` only).

        The file belongs to the checkpoint: a value of the wrong type or out of range there is a
        ``CheckpointError`` naming the file and the key."""
        path = Path(path)
        values = {k: v for k, v in defaults.items() if v is not None}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as e:
                raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
            values.update(_file_values(JsonFields(data, str(path))))
        try:
            return cls().updated(**values)
        except InputError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with ``overrides`` applied (None means "keep"), checked."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "eos_token_id" in values:
            eos = values["eos_token_id"]
            values["eos_token_id"] = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
        cfg = replace(self, **values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise InputError(f"min_new_tokens must be 0 or more, not {self.min_new_tokens}")
        if self.num_beams < 1:
            raise InputError(f"num_beams must be at least 1, not {self.num_beams}")
        if not self.temperature > 0:
            raise InputError(
                f"temperature must be > 0, not {self.temperature} (use do_sample=False for greedy)"
            )
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or more, not {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise InputError(f"top_p must lie in [0, 1], not {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise InputError(f"early_stopping must be True, False or 'never', not {self.early_stopping!r}")


def _file_values(f: JsonFields) -> dict[str, Any]:
    """The known keys of a ``generation_config.json``, each of its type (ranges: ``check``)."""
    read = {
        "max_new_tokens": f.integer,
        "min_new_tokens": f.integer,
        "num_beams": f.integer,
        "top_k": f.integer,
        "seed": f.integer,
        "pad_token_id": f.integer,
        "do_sample": f.flag,
        "temperature": f.number,
        "top_p": f.number,
        "repetition_penalty": f.number,
        "length_penalty": f.number,
    }
    values = {name: reader(name) for name, reader in read.items() if f.has(name)}
    if f.has("eos_token_id"):
        eos = f.data["eos_token_id"]
        if not isinstance(eos, list) or not eos:
            values["eos_token_id"] = f.integer("eos_token_id", min=0)
        elif all(is_integer(e) and e >= 0 for e in eos):
            values["eos_token_id"] = tuple(eos)
        else:
            raise f.fail("eos_token_id", "a token id or a list of them")
    if f.has("early_stopping"):
        values["early_stopping"] = f.data["early_stopping"]  # True, False or "never": ``check`` says
    return values


# ============================================================================ runners


def content_key(tensor: torch.Tensor, *tags: object) -> str:
    """A key naming a tensor's exact content and shape, plus ``tags`` (dtype, device, ...)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return ":".join([digest, str(tuple(data.shape)), str(data.dtype), *map(str, tags)])


class LRUCache:
    """A bounded map, least recently used out first; ``get`` counts ``hits`` and ``misses``."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class PrefillCache(LRUCache):
    """Keys and values of a prompt's first positions, reused by later prompts that start the same way.

    For OPT the image prefix and BOS open every prompt about an image: a second question about it
    prefills only its own tokens. An entry is keyed by the exact bytes of those positions'
    embeddings (a single unpadded row, positions from 0), which is all their keys and values depend on.
    """

    def __init__(self, size: int = 8):
        super().__init__(size)

    @staticmethod
    def key(embeds: torch.Tensor) -> str:
        return content_key(embeds, embeds.device)


class OPTRunner:
    """Decoder-only: the prompt's embeddings are prefilled into a static cache.

    Rows are padded after their first ``shared`` positions (image prefix and BOS), which every row has
    in full. When those positions are the same in every row (questions about one image), they are
    prefilled once and their keys and values copied to each row; with a ``prefill_cache`` they are also
    kept across calls, so a later prompt about the image prefills only its own tokens.
    """

    def __init__(
        self,
        lm: OPT,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        prefill_cache: PrefillCache | None = None,
        shared: int = 0,
    ):
        b, t, _ = embeds.shape
        self.lm, self.embeds, self.pos = lm, embeds, t
        self.cache = lm.new_cache(b, t + max_new_tokens, dtype=embeds.dtype)  # each on its layer's device
        # The mask for every position the cache will hold; new positions are always real tokens.
        self.mask = torch.ones(b, t + max_new_tokens, dtype=torch.long, device=embeds.device)
        self.mask[:, :t] = mask
        self.prefill_cache, self.shared, self.cache_key = prefill_cache, 0, None
        # one row gains from a separate pass over its shared positions only when they are kept for later
        if 0 < shared < t and (b > 1 or prefill_cache is not None) and bool(mask[:, :shared].all()):
            head = embeds[:, :shared]
            if b == 1 or torch.equal(head, head[:1].expand_as(head)):
                self.shared = shared
                if prefill_cache is not None:
                    self.cache_key = prefill_cache.key(head[:1])

    def _shared_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the shared positions for one row: from the cache, else computed."""
        cached = self.prefill_cache.get(self.cache_key) if self.cache_key is not None else None
        if cached is not None:
            return cached
        head = self.lm.new_cache(1, self.shared, dtype=self.embeds.dtype)
        self.lm(self.embeds[:1, : self.shared], self.mask[:1, : self.shared], head, start=0)
        kv = [(c.k, c.v) for c in head]
        if self.cache_key is not None:
            self.prefill_cache.put(self.cache_key, kv)
        return kv

    def prefill(self) -> torch.Tensor:
        start = self.shared
        if start:
            b = self.embeds.shape[0]
            for c, (k, v) in zip(self.cache, self._shared_kv(), strict=True):
                c.write(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), 0)
        hidden = self.lm(self.embeds[:, start:], self.mask[:, : self.pos], self.cache, start=start)
        self.embeds = None  # free
        return self.lm.logits(hidden[:, -1])  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) tokens at position ``pos`` -> logits (B, V) for the next one."""
        x = self.lm.embed(tokens[:, None])
        hidden = self.lm(x, self.mask[:, : self.pos + 1], self.cache, start=self.pos)
        self.pos += 1
        return self.lm.logits(hidden[:, -1])

    def static_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """As :meth:`step` at the position held by the 0-dim tensor ``pos``, attending over the whole
        cache: every shape and Python value is the same at each step (what a CUDA graph captures).
        Does not advance ``pos``."""
        x = self.lm.embed(tokens[:, None])
        return self.lm.logits(self.lm(x, self.mask, self.cache, start=pos)[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.cache:
            c.reorder(index)
        self.mask = self.mask.index_select(0, index)

    def reorder_(self, index: torch.Tensor) -> None:
        """As :meth:`reorder`, in place."""
        for c in self.cache:
            c.reorder_(index)
        self.mask.copy_(self.mask.index_select(0, index))


class T5Runner:
    """Encoder-decoder: the prompt is encoded once; the decoder starts from ``decoder_start_token_id``."""

    def __init__(self, lm: T5, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int):
        encoded = lm.encode(embeds, mask)
        self.lm, self.pos = lm, 0
        self.cache = lm.new_cache(encoded, mask, max_len=1 + max_new_tokens)
        self.start = torch.full(
            (embeds.shape[0],), lm.cfg.decoder_start_token_id, dtype=torch.long, device=embeds.device
        )

    def prefill(self) -> torch.Tensor:
        return self.step(self.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.decode(self.lm.embed(tokens[:, None]), cache=self.cache, start=self.pos)
        self.pos += 1
        return self.lm.logits(hidden[:, -1])

    def static_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """As :meth:`OPTRunner.static_step`."""
        hidden = self.lm.decode(self.lm.embed(tokens[:, None]), cache=self.cache, start=pos)
        return self.lm.logits(hidden[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)

    def reorder_(self, index: torch.Tensor) -> None:
        self.cache.reorder_(index)


def make_runner(
    lm: OPT | T5,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    prefill_cache: PrefillCache | None = None,
    shared: int = 0,
    decoder=None,
):
    """The runner for ``lm``; with a ``decoder`` (``blip2.fastdecode.StaticDecoder``) its decode steps
    run on static buffers, captured once per shape and replayed."""
    if isinstance(lm, T5):
        runner = T5Runner(lm, embeds, mask, max_new_tokens)
    else:
        runner = OPTRunner(lm, embeds, mask, max_new_tokens, prefill_cache, shared)
    return decoder.wrap(runner) if decoder is not None else runner


# ============================================================================ logits processors


def seen_tokens(history: torch.Tensor, history_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T) ids with a 0/1 mask -> (B, V) boolean "this id occurred" (for the repetition penalty)."""
    seen = torch.zeros(history.shape[0], vocab + 1, dtype=torch.bool, device=history.device)
    ids = history.masked_fill(history_mask == 0, vocab).clamp(0, vocab)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]


def process(
    scores: torch.Tensor,
    cfg: GenerationConfig,
    seen: torch.Tensor | None,
    eos: torch.Tensor,
    step: int,
    min_keep: int = 1,
) -> torch.Tensor:
    """Next-token scores (B, V) float32 -> processed scores, in the reference's order."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        p = cfg.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    if step < cfg.min_new_tokens and eos.numel():
        scores = scores.index_fill(1, eos, -float("inf"))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k:
            k = min(max(cfg.top_k, min_keep), scores.shape[-1])
            kth = torch.topk(scores, k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if cfg.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative <= (1 - cfg.top_p)
            drop[..., -min_keep:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def _generator(cfg: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if not cfg.do_sample or cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


# ============================================================================ greedy / sampling


def check_forced(forced: list[list[int]] | None, batch: int, cfg: GenerationConfig, vocab: int) -> None:
    """Forced tokens (see :func:`token_steps`) must be one list per row, of ids within the vocabulary."""
    if not forced:
        return
    if cfg.num_beams > 1:
        raise InputError("forced tokens need greedy or sampled decoding, not beam search")
    if len(forced) != batch:
        raise InputError(f"forced tokens for {len(forced)} rows, the batch has {batch}")
    if any(len(row) > cfg.max_new_tokens for row in forced):
        raise InputError(f"more forced tokens than max_new_tokens={cfg.max_new_tokens}")
    if any(not 0 <= t < vocab for row in forced for t in row):
        raise InputError(f"a forced token id lies outside the vocabulary (0..{vocab - 1})")


def _forced_table(forced: list[list[int]], batch: int, device: torch.device):
    """Rows' forced tokens -> ((B, F) ids, right-padded with 0; (B,) how many each row has)."""
    width = max((len(row) for row in forced), default=0)
    table = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, row in enumerate(forced):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return table, torch.tensor([len(row) for row in forced], device=device)


def token_steps(
    runner,
    cfg: GenerationConfig,
    seen: torch.Tensor | None,
    batch: int,
    device: torch.device,
    forced: list[list[int]] | None = None,
) -> Iterator[list[int]]:
    """Greedy or sampled decoding: yields the B new tokens of each step (a list).

    A row that produced EOS keeps receiving the pad token (never yielded as text) until every row is
    done or ``max_new_tokens`` is reached. ``forced``: per row, tokens taken as its first new tokens
    instead of the chosen ones (they go through the same steps, so what follows them is what a run
    that had chosen them would give). Reading the new tokens is the one wait for the device per
    step: the next step is fed from the tokens still on the device, and "all rows done" is decided
    from what was read.
    """
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long, device=device)
    eos_ids = set(cfg.eos_token_id)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or (0,))[0]
    gen = _generator(cfg, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    finished = [False] * batch
    table, counts = _forced_table(forced, batch, device) if forced else (None, None)
    logits = runner.prefill()
    for step in range(cfg.max_new_tokens):
        scores = process(logits.float(), cfg, seen, eos, step)
        if cfg.do_sample:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        if table is not None and step < table.shape[1]:
            tokens = torch.where(step < counts, table[:, step], tokens)
        tokens = tokens.masked_fill(done, pad)
        row = tokens.tolist()
        yield row
        finished = [f or t in eos_ids for f, t in zip(finished, row, strict=True)]
        if step + 1 == cfg.max_new_tokens or all(finished):
            return
        done |= torch.isin(tokens, eos)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = runner.step(tokens)


# ============================================================================ beam search


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 (beams) of a (B, K, ...) tensor with (B, K') indices."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def beam_search(
    runner, cfg: GenerationConfig, seen: torch.Tensor | None, batch: int, device: torch.device
) -> list[list[int]]:
    """The reference's beam search (``_beam_search`` in transformers 5.x), with our cache; the best
    hypothesis of each row, as its new tokens."""
    k, n = cfg.num_beams, cfg.max_new_tokens
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long, device=device)
    keep = max(2, 1 + eos.numel()) * k  # candidates per row: enough to keep K running beams
    top_k_mask = torch.arange(keep, device=device) < k
    length_penalty, early = cfg.length_penalty, cfg.early_stopping
    gen = _generator(cfg, device)
    fill = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    logits = runner.prefill()  # (B, V): the prompt is the same for all K beams of a row
    expand = torch.arange(batch, device=device).repeat_interleave(k)
    runner.reorder(expand)
    logits = logits.index_select(0, expand)  # (B*K, V)
    if seen is not None:
        seen = seen.index_select(0, expand)
    vocab = logits.shape[-1]
    row_offset = torch.arange(batch, device=device)[:, None] * k

    run_tokens = torch.full((batch, k, n), fill, dtype=torch.long, device=device)
    run_scores = torch.zeros(batch, k, device=device)
    run_scores[:, 1:] = NEG  # only the first beam expands at the first step
    done_tokens = run_tokens.clone()
    done_len = torch.zeros(batch, k, dtype=torch.long, device=device)
    done_scores = torch.full((batch, k), NEG, device=device)
    is_done = torch.zeros(batch, k, dtype=torch.bool, device=device)
    may_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for step in range(n):
        if step:
            logits = runner.step(run_tokens[:, :, step - 1].reshape(-1))
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = process(logp, cfg, seen, eos, step, min_keep=1 + eos.numel())
        logp = (logp.view(batch, k, vocab) + run_scores[..., None]).view(batch, k * vocab)

        # candidates: the best `keep` (beam, token) pairs of each row
        if cfg.do_sample:
            flat = torch.multinomial(logp.softmax(-1), keep, generator=gen)
            cand_scores = logp.gather(1, flat)
        else:
            cand_scores, flat = torch.topk(logp, keep)
        beam, token = flat // vocab, flat % vocab
        cand_tokens = _take(run_tokens, beam)  # (B, keep, N)
        cand_tokens[:, :, step] = token
        cand_rows = beam + row_offset  # flattened source row of each candidate
        stops = torch.isin(token, eos) | (step + 1 >= n)

        # the K best candidates that go on
        going = cand_scores + stops.float() * NEG
        pick = torch.topk(going, k).indices
        run_tokens, run_scores, src_rows = (
            _take(cand_tokens, pick),
            _take(going, pick),
            _take(cand_rows, pick),
        )

        # finished hypotheses: only among the first K candidates, length-normalised, merged with the kept ones
        just_done = stops & top_k_mask[None]
        scored = cand_scores / ((step + 1) ** length_penalty)
        scored = scored + (is_done.all(-1, keepdim=True) & (early is True)).float() * NEG
        scored = scored + (~may_improve).float() * NEG
        scored = scored + (~just_done).float() * NEG
        merged = torch.topk(torch.cat([done_scores, scored], 1), k).indices
        done_tokens = _take(torch.cat([done_tokens, cand_tokens], 1), merged)
        done_scores = _take(torch.cat([done_scores, scored], 1), merged)
        cand_len = torch.full_like(cand_scores, step + 1, dtype=torch.long)
        done_len = _take(torch.cat([done_len, cand_len], 1), merged)
        is_done = _take(torch.cat([is_done, just_done], 1), merged)

        # caches follow their beams
        rows = src_rows.reshape(-1)
        runner.reorder(rows)
        if seen is not None:
            seen = seen.index_select(0, rows)
            seen.scatter_(1, run_tokens[:, :, step].reshape(-1, 1), True)

        # can any running beam still beat the worst kept hypothesis?
        generated = step + 1
        best_len = n if (early == "never" and length_penalty > 0.0) else generated
        best_running = run_scores[:, :1] / (best_len**length_penalty)
        worst_done = torch.where(is_done, done_scores.min(1, keepdim=True).values, NEG)
        may_improve = may_improve & (best_running > worst_done).any(-1, keepdim=True)
        open_beams = not (bool(is_done.all()) and early is True)
        if not (bool(may_improve.any()) and open_beams and not bool(stops.all())):
            break

    out = []
    for b in range(batch):
        out.append(done_tokens[b, 0, : int(done_len[b, 0])].tolist())
    return out


# ============================================================================ entry point


def generate_ids(
    lm: OPT | T5,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerationConfig,
    prompt_ids: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    prefill_cache: PrefillCache | None = None,
    shared: int = 0,
    decoder=None,
) -> list[list[int]]:
    """New token ids per row (EOS included when produced), for (B, T, D) prompt embeddings and mask.

    ``prompt_ids`` / ``prompt_mask`` (B, T'): the ids the repetition penalty sees for an OPT prompt.
    ``shared``: how many leading positions every row has unpadded (OPT: image prefix and BOS); when they
    are equal in all rows they are prefilled once, and with ``prefill_cache`` reused across calls
    (see :class:`OPTRunner`). ``decoder``: see :func:`make_runner`.
    """
    # unpacked, not next(): the run's end closes the runner (a static decoder's buffers go back)
    [out] = _run(lm, embeds, mask, cfg, prompt_ids, prompt_mask, False, prefill_cache, shared, decoder)
    return out


def stream_ids(
    lm: OPT | T5,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerationConfig,
    prompt_ids: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    forced: list[list[int]] | None = None,
    decoder=None,
) -> Iterator[list[int | None]]:
    """Per step, each row's new token (None once the row is done). Beam search yields its whole
    result at the end, one token per step. ``forced``: see :func:`token_steps` (not with beams).
    ``decoder``: see :func:`make_runner`."""
    yield from _run(
        lm, embeds, mask, cfg, prompt_ids, prompt_mask, stream=True, forced=forced, decoder=decoder
    )


def _run(
    lm: OPT | T5,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    cfg: GenerationConfig,
    prompt_ids: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    stream: bool,
    prefill_cache: PrefillCache | None = None,
    shared: int = 0,
    decoder=None,
    forced: list[list[int]] | None = None,
):
    batch, device = embeds.shape[0], embeds.device
    vocab = lm.lm_head.out_features
    seen = None
    if cfg.repetition_penalty != 1.0:
        if isinstance(lm, T5):
            start = torch.full((batch, 1), lm.cfg.decoder_start_token_id, dtype=torch.long, device=device)
            seen = seen_tokens(start, torch.ones_like(start), vocab)
        elif prompt_ids is not None:
            pm = prompt_mask if prompt_mask is not None else torch.ones_like(prompt_ids)
            seen = seen_tokens(prompt_ids.to(device), pm.to(device), vocab)
        else:
            seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    check_forced(forced, batch, cfg, vocab)
    runner = make_runner(lm, embeds, mask, cfg.max_new_tokens, prefill_cache, shared, decoder)
    try:
        yield from _decode(runner, cfg, seen, batch, device, stream, forced)
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()


def _decode(runner, cfg, seen, batch, device, stream: bool, forced: list[list[int]] | None = None):
    eos = set(cfg.eos_token_id)
    if cfg.num_beams > 1:
        result = beam_search(runner, cfg, seen, batch, device)
        if not stream:
            yield result
            return
        for step in range(max(len(r) for r in result)):
            yield [r[step] if step < len(r) else None for r in result]
        return

    out: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    for tokens in token_steps(runner, cfg, seen, batch, device, forced):
        row_tokens: list[int | None] = []
        for i, t in enumerate(tokens):
            if finished[i]:
                row_tokens.append(None)
                continue
            out[i].append(t)
            row_tokens.append(t)
            finished[i] = t in eos
        if stream:
            yield row_tokens
    if not stream:
        yield out
