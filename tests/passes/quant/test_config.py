"""quantize= option parsing: schemes, options, layer patterns, groups, and typed refusals."""

import pytest

from transfuse.errors import PassError
from transfuse.passes.quant.config import (
    SCHEMES,
    LayerSpec,
    QuantConfig,
    parse_quantize,
    working_groups,
)


def test_scheme_names_and_their_defaults():
    facts = {s: (c.body.bits, c.body.op, c.body.is_symmetric, c.body.needs_calibration)
             for s in SCHEMES for c in [parse_quantize(s)]}
    assert facts == {
        "int8-weight": (8, "qlinear", False, False),
        "int4-weight": (4, "qlinear", False, False),
        "int4-gptq": (4, "qlinear", False, True),
        "int4-awq": (4, "qlinear", False, True),
        "w8a8": (8, "qmatmul", True, True),  # SmoothQuant 0.5 by default
        "fp8": (8, "qlinear", True, False),
    }
    assert parse_quantize("w8a8").body.smoothquant_alpha == 0.5
    assert not parse_quantize({"scheme": "w8a8", "smoothquant": 0}).body.needs_calibration
    cfg = parse_quantize("int4-awq")
    assert parse_quantize(cfg) is cfg


def test_full_dict():
    cfg = parse_quantize({"scheme": "int4-gptq", "group": 64, "act_order": True, "damp": 0.02,
                          "keep_float": ["lm_head"], "min_sqnr": 20, "symmetric": True,
                          "layers": {"*.down_proj": "int8-weight", "*.attn.*": {"group": 32},
                                     "*.o_proj": "float"},
                          "head": {"scheme": "int8-weight", "group": 32}})
    assert cfg.body == LayerSpec("int4-gptq", group=64, symmetric=True, act_order=True,
                                 damp=0.02)
    layers = dict(cfg.layers)
    assert layers["*.down_proj"] == LayerSpec("int8-weight")  # another scheme: its defaults
    # no scheme: the body's settings, refined
    assert layers["*.attn.*"] == LayerSpec("int4-gptq", group=32, symmetric=True,
                                           act_order=True, damp=0.02)
    assert layers["*.o_proj"] is None
    assert cfg.head == LayerSpec("int8-weight", group=32)
    assert cfg.keep_float == ("lm_head",) and cfg.min_sqnr == 20.0
    assert "int4-gptq g64 sym act_order" in cfg.describe()


def test_pattern_precedence():
    cfg = parse_quantize({"scheme": "int4-weight", "keep_float": ["*.mlp.up_proj"],
                          "layers": {"*.mlp.*": "int8-weight", "layers.0.*": "fp8"}})
    def spec(name, head=False):
        return cfg.spec_for([name], head)

    assert spec("layers.0.mlp.up_proj") == (None, "keep_float pattern '*.mlp.up_proj'")
    assert spec("layers.0.mlp.down_proj")[0].scheme == "int8-weight"  # first match wins
    assert spec("layers.0.attn.o_proj")[0].scheme == "fp8"
    assert spec("layers.1.attn.o_proj")[0].scheme == "int4-weight"
    # the LM head: int8-weight by default under an int4 body; the source also matches
    head, why = spec("lm_head", head=True)
    assert head.scheme == "int8-weight" and "by default" in why
    assert cfg.spec_for(["layers.1.attn.qkv_proj", "layers.1.attn.q_proj"], False)[0].scheme \
        == "int4-weight"
    assert parse_quantize("int8-weight").spec_for(["lm_head"], True)[0].scheme == "int8-weight"
    assert parse_quantize({"scheme": "int4-weight", "head": "float"}).spec_for(
        ["lm_head"], True)[0] is None
    assert parse_quantize({"scheme": "int4-weight", "keep_float": "lm_head"}).keep_float == \
        ("lm_head",)


def test_groups():
    int4 = LayerSpec("int4-weight")
    assert int4.group_for(576) == (64, None)  # 576 = 9 * 64
    assert int4.group_for(768) == (128, None)
    assert int4.group_for(176) == (16, None)
    g, why = int4.group_for(200)  # 8 * 25: no power of two >= 16
    assert g is None and "group=" in why
    assert int4.group_for(175)[1].startswith("int4 needs an even K")
    assert LayerSpec("int8-weight").group_for(176) == (176, None)
    assert LayerSpec("w8a8").group_for(176) == (176, None)
    assert LayerSpec("int8-weight", group=16).group_for(176) == (16, None)
    g, why = LayerSpec("int4-weight", group=128).group_for(576)
    assert g is None and why == "group 128 does not divide K=576; groups that work: 16, 32, 64, 576"
    assert working_groups(200, 4) == [8, 10, 20, 40, 50, 100, 200]


@pytest.mark.parametrize("spec, message", [
    ("int3-weight", "unknown scheme 'int3-weight'; valid schemes: int8-weight, int4-weight, "
                    "int4-gptq, int4-awq, w8a8, fp8"),
    (42, "quantize must be a scheme name"),
    ({"group": 64}, "needs 'scheme'"),
    ({"scheme": "int4-weight", "groups": 64}, "unknown option(s) 'groups'; valid options: scheme, "
                                              "group,"),
    ({"scheme": "int4-weight", "group": 0}, "group must be an int >= 2"),
    ({"scheme": "int4-weight", "group": True}, "group must be an int >= 2"),
    ({"scheme": "w8a8", "group": 64}, "w8a8 is per channel"),
    ({"scheme": "fp8", "symmetric": False}, "fp8 weights are symmetric"),
    ({"scheme": "int4-weight", "act_order": True}, "act_order is GPTQ's: it applies where GPTQ "
                                                   "rounds (int4-gptq, or int8-weight, w8a8, "
                                                   "int4-awq; not int4-weight)"),
    ({"scheme": "int4-awq", "act_order": True}, "(int4-awq with gptq=True)"),
    ({"scheme": "int8-weight", "gptq": False, "damp": 0.1}, "(int8-weight unless gptq=False)"),
    ({"scheme": "int4-weight", "gptq": True}, "int4 with GPTQ is scheme int4-gptq"),
    ({"scheme": "fp8", "gptq": True}, "gptq applies to int8-weight, w8a8, int4-awq"),
    ({"scheme": "int4-gptq", "gptq": False}, "use int4-weight for round-to-nearest"),
    ({"scheme": "int4-awq", "gptq": True, "clip": True}, "exclude each other"),
    ({"scheme": "w8a8", "gptq": 1}, "gptq must be True or False"),
    ({"scheme": "int4-awq", "smoothquant": 0.5}, "AWQ searches its own scales"),
    ({"scheme": "w8a8", "smoothquant": 1.5}, "smoothquant must be an alpha in [0, 1]"),
    ({"scheme": "int4-gptq", "damp": 2}, "damp must be a number in (0, 1)"),
    ({"scheme": "int4-weight", "clip": False}, "clip (AWQ's clipping search) applies to int4-awq"),
    ({"scheme": "w8a8", "act_quant": "channel"}, "act_quant must be one of token, tensor"),
    ({"scheme": "int4-weight", "layers": {"*.x": "int2"}}, "layers['*.x']: unknown scheme 'int2'"),
    ({"scheme": "int4-weight", "layers": {"*.x": {"bits": 2}}},
     "layers['*.x']: unknown option(s) 'bits'"),
    ({"scheme": "int4-weight", "layers": {"*.x": {"scheme": "w8a8", "group": 32}}},
     "layers['*.x']: w8a8 is per channel"),
    ({"scheme": "int4-weight", "layers": ["*.x"]}, "layers must be a dict"),
    ({"scheme": "int4-weight", "keep_float": [1]}, "keep_float must be a list of layer patterns"),
    ({"scheme": "int4-weight", "min_sqnr": "high"}, "min_sqnr must be a number of dB"),
    ({"scheme": "int4-weight", "head": "int5"}, "head: unknown scheme 'int5'"),
    ({"scheme": "float"}, "unknown scheme 'float'"),
])
def test_refusals_name_the_problem_and_the_valid_values(spec, message):
    with pytest.raises(PassError) as e:
        parse_quantize(spec)
    assert message in str(e.value)


def test_gptq_rounding_follows_calibration_unless_given():
    """int8-weight and w8a8 round with GPTQ when calibration data is given (or GPTQ's own
    options are); int4-awq keeps AWQ's clip search; an explicit gptq= is never overridden."""
    for scheme in ("int8-weight", "w8a8"):
        assert LayerSpec(scheme).resolved(True).uses_gptq
        assert not LayerSpec(scheme).resolved(False).uses_gptq
        assert not LayerSpec(scheme).resolved(False).needs_calibration or scheme == "w8a8"
        assert not LayerSpec(scheme, gptq=False).resolved(True).uses_gptq
        assert LayerSpec(scheme, gptq=True).resolved(False).needs_calibration
        assert LayerSpec(scheme, damp=0.1).resolved(False).uses_gptq
        assert LayerSpec(scheme, act_order=True).resolved(False).uses_gptq
    assert not LayerSpec("int4-awq").resolved(True).uses_gptq
    assert LayerSpec("int4-awq").resolved(True).clip_search
    awq_gptq = LayerSpec("int4-awq", gptq=True)
    assert awq_gptq.uses_gptq and not awq_gptq.clip_search
    assert LayerSpec("int4-gptq").resolved(False).uses_gptq
    assert not LayerSpec("int4-weight").resolved(True).uses_gptq
    assert LayerSpec("int8-weight", gptq=True).describe() == "int8-weight gptq"
    assert LayerSpec("w8a8", gptq=False).describe() == "w8a8 rtn"


def test_head_default_follows_body():
    assert QuantConfig(LayerSpec("int4-gptq")).head_spec() == LayerSpec("int8-weight")
    w8 = LayerSpec("w8a8", smoothquant=0.8)
    assert QuantConfig(w8).head_spec() == w8
