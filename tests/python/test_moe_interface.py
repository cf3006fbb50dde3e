"""The MoE layer's interface is declared once (csrc/model/moe_interface.h):
every row reaches the op's schema, nn.MoE, MoEResult, the model's config,
the model's outputs and the docs, with the same name, default and checks."""

import importlib.util
import inspect
import os

import pytest
import torch

import moeyard
from moeyard import MoE, MoEResult

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = moeyard._C.moe_interface()
OPTIONS = TABLE["options"]
OUTPUTS = TABLE["outputs"]


def schema():
    return torch.ops.moeyard.moe_forward.default._schema


def bad_value(row):
    """A value outside the row's allowed values (None: a flag, every value is allowed)."""
    if row["choices"]:
        return "no_such_" + row["name"]
    if row["range"]:
        return -1000000 if row["type"] == "int" else float("nan")
    return None


def test_op_schema_is_the_table():
    args = {a.name: a for a in schema().arguments}
    kwarg_only = [a.name for a in schema().arguments if a.kwarg_only]
    assert kwarg_only == [r["name"] for r in OPTIONS] + ["training"]
    for row in OPTIONS:
        assert args[row["name"]].default_value == row["default"], row["name"]
    positional = [a.name for a in schema().arguments if not a.kwarg_only]
    assert positional == ["x"] + [w["name"] for w in TABLE["weights"]] + ["mask", "token_ids", "drop_lowest"]
    assert [r.name for r in schema().returns] == [o["name"] for o in OUTPUTS]


def test_nn_moe_keywords_docstring_and_result_are_the_table():
    sig = inspect.signature(MoE.__init__)
    for row in OPTIONS:
        assert sig.parameters[row["name"]].default == row["default"], row["name"]
        assert f"{row['name']} (" in MoE.__doc__ and row["doc"] in MoE.__doc__, row["name"]
    fields = [f for f in MoEResult.__dataclass_fields__]
    assert fields == [o["name"] for o in OUTPUTS if o["name"] != "y"]
    m = MoE(8, 4, 4, 2)
    for row in OPTIONS:
        assert getattr(m, row["name"]) == row["default"], row["name"]


@pytest.mark.parametrize("row", [r for r in OPTIONS if bad_value(r) is not None], ids=lambda r: r["name"])
def test_every_option_is_checked_the_same_everywhere(row):
    """A bad value fails in nn.MoE (ValueError), in the op (RuntimeError) and
    in a model config, each naming the option."""
    bad = bad_value(row)
    with pytest.raises(ValueError, match=row["name"]):
        MoE(8, 4, 4, **({"top_k": 2} | {row["name"]: bad}))
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=row["name"]):
        torch.ops.moeyard.moe_forward(x, torch.randn(4, 8), None, torch.randn(4, 6, 8), torch.randn(4, 8, 3),
                                      **{row["name"]: bad})
    cfg = {"vocab_size": 16, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 8,
           "moe": {"num_experts": 4, row["name"]: bad}}
    with pytest.raises(RuntimeError, match="moe." + row["name"]):
        moeyard.Transformer(cfg)


def test_unknown_option_names_the_known_ones():
    with pytest.raises(TypeError, match="unknown option 'topk'.*top_k"):
        MoE(8, 4, 4, topk=2)


def test_every_key_is_accepted_by_a_model_config():
    """Each structure key, option and coefficient is a `moe:` key (its
    default given explicitly builds the same model)."""
    rows = TABLE["structure"] + OPTIONS + TABLE["coefficients"]
    moe = {r["name"]: r["default"] for r in rows}
    moe.update(num_experts=4, top_k=2)
    cfg = {"vocab_size": 16, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 8, "moe": moe}
    torch.manual_seed(0)
    a = moeyard.Transformer(cfg)
    torch.manual_seed(0)
    b = moeyard.Transformer(dict(cfg, moe={"num_experts": 4, "top_k": 2}))
    tokens = torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(a.loss(tokens)["loss"], b.loss(tokens)["loss"], rtol=0, atol=0)


def test_model_outputs_report_every_aux_loss_and_statistic():
    cfg = {"vocab_size": 16, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 8,
           "moe": {"num_experts": 4, "top_k": 2}}
    out = moeyard.Transformer(cfg)(torch.randint(0, 16, (2, 5)))
    layer = out["moe_layers"][0]
    for o in OUTPUTS:
        if o["name"] != "y":
            assert o["name"] in layer, o["name"]


def test_aux_loss_is_the_coefficient_weighted_sum():
    """Transformer.loss's aux term: sum over layers and aux-loss rows of
    coefficient * loss, with every coefficient set apart from zero."""
    coeffs = {c["name"]: 0.1 * (i + 1) for i, c in enumerate(TABLE["coefficients"])}
    cfg = {"vocab_size": 16, "hidden_size": 8, "num_layers": 2, "num_heads": 2, "ffn_size": 8,
           "moe": {"num_experts": 4, "top_k": 2, **coeffs}}
    r = moeyard.Transformer(cfg).loss(torch.randint(0, 16, (2, 5)))
    want = sum(coeffs[o["coefficient"]] * layer[o["name"]].double()
               for layer in r["moe_layers"] for o in OUTPUTS if o["kind"] == "aux_loss")
    torch.testing.assert_close(r["aux"].double(), want, rtol=1e-6, atol=0)


def test_docs_table_is_generated_from_the_tables():
    spec = importlib.util.spec_from_file_location("gen_docs", os.path.join(ROOT, "scripts", "gen_docs.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = open(os.path.join(ROOT, "docs", "model.md")).read()
    assert gen.current_block(text) == gen.moe_table(), "docs/model.md is stale: run scripts/gen_docs.py"
