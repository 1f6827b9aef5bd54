"""Placement over devices: units and their sizes, plans from sizes and budgets or from maps, and the
hooks that carry activations across devices (run on the CPU: a split between "cpu" and "meta" fails
where an activation reaches a layer on another device, as a split between two GPUs would)."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.generate import OPTRunner, T5Runner
from blip2.models.config import Blip2Config, LlamaConfig, OPTConfig, T5Config
from blip2.placement import (
    GiB,
    PlacementError,
    meta_model,
    model_units,
    parse_bytes,
    place,
    plan_auto,
    plan_from_map,
)
from factory import make_images

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")

# the released checkpoints' shapes (config.py's defaults are blip2-opt-2.7b's ViT-g, Q-Former and OPT)
SHAPES = {
    "blip2-opt-2.7b": Blip2Config(),
    "blip2-opt-6.7b": Blip2Config(
        text=OPTConfig(hidden_size=4096, mlp_size=16384, word_embed_proj_dim=4096, num_heads=32)
    ),
    "blip2-flan-t5-xl": Blip2Config(text=T5Config()),
    "blip2-flan-t5-xxl": Blip2Config(text=T5Config(hidden_size=4096, num_heads=64, mlp_size=10240)),
    "instructblip-vicuna-7b": Blip2Config(text=LlamaConfig(), instruction_aware=True),
}


@pytest.fixture(scope="module")
def metas():
    return {name: meta_model(cfg) for name, cfg in SHAPES.items()}


def _sizes(metas, name, dtype=torch.float16, bits=None):
    return model_units(metas[name], dtype, bits)


def _check_order(plan, budgets):
    """Units on non-decreasing devices in budget order, each device within its budget."""
    rank = {d: i for i, (d, _) in enumerate(budgets)}
    ranks = [rank[plan.devices[u.name]] for u in plan.units]
    assert ranks == sorted(ranks)
    for device, used in plan.bytes_per_device().items():
        assert used <= dict(budgets)[device]


# ---- units ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_units_cover_every_parameter_once_in_flow_order(metas, name):
    model = metas[name]
    units = model_units(model, torch.float16)
    names = [u.name for u in units]
    assert names[:3] == ["vision", "qformer", "language_model.embed"]
    text = SHAPES[name].text
    if isinstance(text, T5Config):
        expected = [f"language_model.encoder.{i}" for i in range(text.num_layers)]
        expected += [f"language_model.decoder.{i}" for i in range(text.num_decoder_layers)]
    else:
        expected = [f"language_model.layers.{i}" for i in range(text.num_layers)]
    assert names[3:] == expected
    owners: dict[str, str] = {}
    for unit in units:
        for module in unit.modules:
            prefix = module + "."
            for pname, _ in model.named_parameters(remove_duplicate=False):
                if pname == module or pname.startswith(prefix):
                    assert pname not in owners, f"{pname} in {owners.get(pname)} and {unit.name}"
                    owners[pname] = unit.name
    assert set(owners) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # the final norm and the head follow the last layer (OPT's tied head stays with its embedding)
    last = units[-1].modules
    assert any(m.endswith("norm") for m in last)
    tied = isinstance(text, OPTConfig)
    assert ("language_model.lm_head" in units[2].modules) == tied
    assert ("language_model.lm_head" in last) != tied


def test_sizes_follow_dtype_rules_and_count_a_tied_head_once(metas):
    model = metas["blip2-opt-2.7b"]
    params = {id(p): p for p in model.parameters()}  # shared tensors once
    qformer = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("qformer.", "queries")))
    total = sum(p.numel() for p in params.values())
    fp16 = sum(u.bytes for u in model_units(model, torch.float16))
    assert fp16 == 2 * total + 2 * qformer  # the Q-Former and its queries stay float32
    assert sum(u.bytes for u in model_units(model, torch.float32)) == 4 * total
    t5 = metas["blip2-flan-t5-xl"]
    wo = sum(p.numel() for n, p in t5.named_parameters() if n.endswith("mlp.wo.weight"))
    t5_params = sum(p.numel() for p in t5.parameters())
    t5_qformer = sum(p.numel() for n, p in t5.named_parameters() if n.startswith(("qformer.", "queries")))
    fp16_t5 = sum(u.bytes for u in model_units(t5, torch.float16))
    assert fp16_t5 == 2 * t5_params + 2 * (t5_qformer + wo)  # T5's wo stays float32 in float16
    assert sum(u.bytes for u in model_units(t5, torch.bfloat16)) == 2 * t5_params + 2 * t5_qformer


@pytest.mark.parametrize("name", list(SHAPES))
def test_quantized_weights_take_at_most_the_issue_budget(metas, name):
    fp16 = sum(u.bytes for u in _sizes(metas, name))
    int8 = sum(u.bytes for u in _sizes(metas, name, bits=8))
    int4 = sum(u.bytes for u in _sizes(metas, name, bits=4))
    assert int8 <= 0.55 * fp16
    assert int4 <= 0.30 * fp16
    assert int4 < int8 < fp16


# ---- automatic plans -----------------------------------------------------------------------------


def test_opt_6_7b_float16_splits_over_two_16gb_gpus(metas):
    units = _sizes(metas, "blip2-opt-6.7b")  # 14.6 GiB: more than a 16 GB card less its reserve
    card = 16 * 10**9 - GiB
    budgets = [(CUDA0, card), (CUDA1, card), (CPU, 64 * GiB)]
    plan = plan_auto(units, budgets)
    _check_order(plan, budgets)
    devices = plan.devices
    assert all(devices[n] == CUDA0 for n in ("vision", "qformer", "language_model.embed"))
    assert devices["language_model.layers.0"] == CUDA0
    assert devices["language_model.layers.31"] == CUDA1  # with the final norm
    assert CPU not in devices.values()
    assert plan.main == CUDA0 and plan.spans_devices
    # cuda:0 is filled before cuda:1 is used: the first unit on cuda:1 did not fit on cuda:0
    first_on_1 = next(u for u in plan.units if devices[u.name] == CUDA1)
    assert plan.bytes_per_device()[CUDA0] + first_on_1.bytes > card
    assert "language_model.layers." in plan.summary()


def test_a_model_that_fits_one_gpu_stays_on_it(metas):
    plan = plan_auto(_sizes(metas, "blip2-opt-2.7b"), [(CUDA0, 22 * GiB), (CPU, 64 * GiB)])
    assert set(plan.devices.values()) == {CUDA0} and not plan.spans_devices
    # int8 brings blip2-opt-6.7b into one 16 GB card
    plan = plan_auto(_sizes(metas, "blip2-opt-6.7b", bits=8), [(CUDA0, 16 * 10**9 - GiB), (CPU, 64 * GiB)])
    assert set(plan.devices.values()) == {CUDA0}


def test_too_small_gpus_offload_the_last_layers_to_the_cpu(metas):
    units = _sizes(metas, "blip2-flan-t5-xxl")
    budgets = [(CUDA0, 15 * GiB), (CPU, 64 * GiB)]
    plan = plan_auto(units, budgets)
    _check_order(plan, budgets)
    assert plan.devices["language_model.encoder.0"] == CUDA0
    assert plan.devices["language_model.decoder.23"] == CPU
    assert plan.main == CUDA0


def test_front_that_fits_no_gpu_goes_where_it_fits(metas):
    units = _sizes(metas, "instructblip-vicuna-7b")
    plan = plan_auto(units, [(CUDA0, 1 * GiB), (CPU, 64 * GiB)])
    assert set(plan.devices.values()) == {CPU}


def test_a_model_that_fits_nowhere_is_a_clear_error(metas):
    units = _sizes(metas, "blip2-opt-6.7b")
    with pytest.raises(PlacementError, match=r"take 14\.\d\d GiB and do not fit: cuda:0 gives 4\.00 GiB"):
        plan_auto(units, [(CUDA0, 4 * GiB), (CPU, 2 * GiB)])
    with pytest.raises(PlacementError, match="need .* GiB on one device"):
        plan_auto(units, [(CUDA0, 1 * GiB), (CPU, 1 * GiB)])
    with pytest.raises(PlacementError, match="no device"):
        plan_auto(units, [])


# ---- maps ----------------------------------------------------------------------------------------------


def test_device_map_with_ranges_and_a_catch_all(metas):
    units = _sizes(metas, "blip2-opt-2.7b")
    plan = plan_from_map(
        units,
        {"vision": 0, "qformer": "cuda:0", "language_model.layers.0-15": "cuda:0", "": "cuda:1"},
    )
    assert plan.devices["vision"] == CUDA0
    assert plan.devices["language_model.embed"] == CUDA1  # the catch-all
    assert plan.devices["language_model.layers.15"] == CUDA0
    assert plan.devices["language_model.layers.16"] == CUDA1
    assert plan.main == CUDA1
    # a key naming a unit takes its norm and head along
    plan = plan_from_map(units, {"": "cuda:0", "language_model.layers.31": "cpu"})
    assert plan.devices["language_model.layers.31"] == CPU
    assert plan.device_of("language_model.norm") == CPU


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        (
            {"vision": "cuda:0"},
            "places no device for qformer, language_model.embed, language_model.layers.0-31",
        ),
        ({"": "cuda:0", "language_model.norm": "cpu"}, "splits unit language_model.layers.31"),
        ({"": "cuda:0", "language_model.layer.3": "cpu"}, "match no part of this model"),
        ({"": "cuda:0", "language_model.layers.5-2": "cpu"}, "empty range"),
        ({"": "tpu:7"}, "not a device"),
    ],
)
def test_bad_device_maps_are_clear_errors(metas, device_map, message):
    with pytest.raises(PlacementError, match=message):
        plan_from_map(_sizes(metas, "blip2-opt-2.7b"), device_map)


def test_budgets_from_max_memory_and_the_plan_summary(metas):
    from blip2.placement import device_budgets

    budgets = device_budgets({"cpu": "40GiB", 1: "12GiB", "cuda:0": 10 * GiB})
    assert budgets == [(CUDA0, 10 * GiB), (CUDA1, 12 * GiB), (CPU, 40 * GiB)]
    assert device_budgets()[-1][0] == CPU  # the CPU's available memory, last
    plan = plan_auto(_sizes(metas, "blip2-opt-2.7b"), [(CUDA0, 3 * GiB), (CUDA1, 3 * GiB), (CPU, 64 * GiB)])
    lines = plan.summary().splitlines()
    assert lines[0].startswith("cuda:0: vision, qformer, language_model.embed, language_model.layers.0-")
    assert lines[1].startswith("cuda:1: language_model.layers.") and lines[2].startswith("cpu: ")


def test_memory_sizes_parse():
    assert parse_bytes("12GiB") == 12 * GiB
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(800) == 800
    with pytest.raises(PlacementError, match="not a memory size"):
        parse_bytes("lots")


def test_load_auto_on_a_machine_without_gpus_is_the_cpu_load(opt_ckpt):
    pipe = blip2.load(opt_ckpt, device="auto")
    assert pipe.device == CPU
    with pytest.raises(PlacementError, match="this machine has 0 CUDA device"):
        blip2.load(opt_ckpt, device={"": "cuda:0"})
    with pytest.raises(PlacementError, match=r"need 0\.\d\d MiB on one device.*cpu gives 97\.66 KiB"):
        blip2.load(opt_ckpt, device="auto", max_memory={"cpu": 100_000})


# ---- the hooks -------------------------------------------------------------------------------------------


PROMPTS = ["a photo of", "question: what colour is the ball? answer:"]


def test_split_code_path_on_one_device_equals_the_plain_load(lm_kind_ckpt):
    _, path = lm_kind_ckpt
    images = make_images(2, seed=3)
    plain = blip2.load(path)
    hooked = blip2.load(path)
    placement = place(hooked.model, plan_from_map(model_units(hooked.model), {"": "cpu"}), hooks=True)
    assert len(placement.hooks) > len(model_units(hooked.model))
    for gen in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3)):
        assert hooked.generate_ids(images, PROMPTS, **gen) == plain.generate_ids(images, PROMPTS, **gen)
    inputs = plain.processor(images=images, text=PROMPTS)
    if plain.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        assert torch.equal(hooked.model(**inputs).logits, plain.model(**inputs).logits)


def _meta_split(pipe):
    """The language model's last layers on the meta device, its outputs kept there (nothing can be
    copied off the meta device, so the image side is run before)."""
    units = model_units(pipe.model)
    layers = [u.name for u in units if u.name not in ("vision", "qformer", "language_model.embed")]
    # the last quarter (T5: within the decoder, whose layers all read the encoder's output)
    device_map = {"": "cpu", **{n: "meta" for n in layers[-max(1, len(layers) // 4) :]}}
    plan = plan_from_map(units, device_map)
    place(pipe.model, plan, main="meta")
    return plan


def test_activations_and_caches_cross_a_device_boundary(lm_kind_ckpt):
    """cpu -> meta late in the language model: ops mixing devices raise (as with two GPUs), so every
    tensor must cross the boundary, and each layer's cache must be on its layer's device."""
    kind, path = lm_kind_ckpt
    pipe = blip2.load(path)
    lm = pipe.model.language_model
    images = make_images(2, seed=3)
    prefix = pipe.image_prefix(pipe.processor.image_processor(images), PROMPTS)
    plan = _meta_split(pipe)
    with torch.inference_mode():
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        embeds, mask = pipe.model.merge_prefix(prefix, ids, torch.ones_like(ids))
        assert embeds.device == CPU
        if kind.endswith("t5"):
            runner = T5Runner(lm, embeds, mask, 4)
            caches = runner.cache.self_attn
            cross = [k.device for k, _ in runner.cache.cross_kv]
            assert cross == [c.k.device for c in caches]
        else:
            runner = OPTRunner(lm, embeds, mask, 4, shared=2)
            caches = runner.cache
        stack = "decoder" if kind.endswith("t5") else "layers"
        assert [c.k.device for c in caches] == [
            plan.devices[f"language_model.{stack}.{i}"] for i in range(len(caches))
        ]
        assert {c.k.device.type for c in caches} == {"cpu", "meta"}
        logits = runner.prefill()
        assert logits.device.type == "meta" and logits.shape == (2, lm.lm_head.out_features)
        runner.step(torch.tensor([3, 4]))
        runner.reorder(torch.tensor([1, 1]))  # beams: the index crosses to each cache's device
        logits = runner.step(torch.tensor([3, 4]))
        assert logits.shape == (2, lm.lm_head.out_features)
        inputs = {"input_ids": ids, "image_prefix": prefix}
        if kind.endswith("t5"):
            inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
        out = pipe.model(**inputs).logits
        assert out.device.type == "meta" and out.shape[0] == 2
