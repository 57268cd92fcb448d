"""The packed-format protocol (lowbit.packed.base): one table of formats filled by their decorators, one bit count,
a package that needs no algorithm code, the fine-tuning views keyed by the same kinds, and the module helpers."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit.packed
from lowbit.calib.finetune import BlockFinetuner, block_finetuner
from lowbit.calib.views import VIEWS, TrainableMixed, TrainableQuip
from lowbit.models.modules import replace_module, run_block
from lowbit.packed import base, qweight
from lowbit.packed.ggufw import GGUFWeight
from lowbit.packed.mixed import MixedBinaryWeight
from lowbit.packed.quipw import QuipWeight, pack_signs, pack_stage
from lowbit.packed.qweight import GroupQuantWeight, OutlierQuantWeight

PACKED_DIR = Path(lowbit.packed.__file__).parent


def test_every_format_is_one_row_of_the_table():
    assert base.FORMATS == {"int": GroupQuantWeight, "int+outliers": OutlierQuantWeight, "bin+int": MixedBinaryWeight,
                            "quip": QuipWeight, "gguf": GGUFWeight}
    assert all(issubclass(cls, base.PackedWeight) for cls in base.FORMATS.values())
    # the names other modules import from qweight are the base's own objects
    assert qweight.FORMATS is base.FORMATS and qweight.from_tensors is base.from_tensors
    assert qweight.FormatError is base.FormatError and qweight._expect is base.expect


def test_a_kind_cannot_be_registered_twice():
    @dataclass(frozen=True)
    class Impostor(base.PackedWeight):
        kind = "int"
        shape: tuple[int, int]

    with pytest.raises(ValueError, match="registered twice"):
        base.register_format(Impostor)
    assert base.FORMATS["int"] is GroupQuantWeight


@pytest.mark.parametrize("meta", [{}, {"kind": "nope"}, {"kind": ["int"]}, None])
def test_unknown_kinds_are_format_errors(meta):
    with pytest.raises(base.FormatError, match="unknown packed format"):
        base.from_tensors({}, meta)


def test_stored_bits_counts_every_stored_bit():
    """4×64 weight, 4 bits, groups of 32, asymmetric: qweight int32 (4, 64·4/32 = 8), scales fp16 (4, 2),
    qzeros int32 (2, ceil(4/32)·4 = 4)."""
    codes = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0))
    w = GroupQuantWeight.from_codes(codes, torch.rand(4, 2) + 0.5, torch.full((4, 2), 7.0), 4, 32)
    assert w.stored_bits() == 4 * 8 * 32 + 4 * 2 * 16 + 2 * 4 * 32
    sym = GroupQuantWeight.from_codes(codes, torch.rand(4, 2) + 0.5, None, 4, 32)
    assert sym.stored_bits() == 4 * 8 * 32 + 4 * 2 * 16


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """``(line, module, level)`` of every import statement in ``path`` (anywhere, also inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
    return out


@pytest.mark.parametrize("path", sorted(PACKED_DIR.glob("*.py")), ids=lambda p: p.name)
def test_packed_imports_no_algorithm_package_and_nothing_at_the_bottom(path):
    for _line, module, level in _imports(path):
        absolute = module if level == 0 else "lowbit." + module if level == 2 else "lowbit.packed." + module
        assert not absolute.startswith(("lowbit.quip", "lowbit.solvers", "lowbit.calib", "lowbit.methods")), \
            f"{path.name} imports {absolute}"
    tree = ast.parse(path.read_text())
    first_def = next((n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))), math.inf)
    late = [n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno > first_def]
    assert not late, f"{path.name}: module-level imports after the first definition, lines {late}"


def _quip(m=16, n=32, seed=0) -> QuipWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << 16, (m, n // 8), generator=g)
    su = torch.randint(0, 2, (m,), generator=g).float() * 2 - 1
    sv = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return QuipWeight((m, n), 2, "e8p", "hadamard", "hadamard", codes=pack_stage("e8p", codes, 2),
                      scales=torch.tensor([0.05]), su=pack_signs(su), sv=pack_signs(sv))


def test_views_are_keyed_by_packed_kind_and_block_finetuner_picks_them():
    assert VIEWS == {"quip": TrainableQuip, "bin+int": TrainableMixed}
    for kind, view in (("quip", TrainableQuip), ("bin+int", TrainableMixed), ("mixed", TrainableMixed)):
        ft = block_finetuner(kind, 3, 1e-3, progress=False)
        assert isinstance(ft, BlockFinetuner) and ft.trainable is view and (ft.steps, ft.lr) == (3, 1e-3)
    with pytest.raises(ValueError, match="no trainable view for packed kind 'int'"):
        block_finetuner("int", 3, 1e-3)


def test_untrained_quip_view_is_the_stored_weight_and_exports_it():
    qw = _quip()
    view = TrainableQuip(qw, None)
    x = torch.randn(3, qw.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(view(x), x @ qw.dequantize().T, atol=1e-5)
    back = view.export()
    assert back.sign_mode == "real" and torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)
    assert torch.allclose(back.dequantize(), qw.dequantize(), atol=1e-6)
    assert not TrainableQuip.applies(QuipWeight((16, 32), 2, "e8p", "none", "none", codes=qw.codes, scales=qw.scales))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 4)

    def forward(self, h, scale, *, shift=0.0, as_tuple=True):
        y = self.head(self.mlp(h)) * scale + shift
        return (y, "cache") if as_tuple else y


def test_replace_module_by_dotted_name_and_at_the_top():
    block, a, b = _Block(), nn.Identity(), nn.Identity()
    replace_module(block, "mlp.0", a)
    replace_module(block, "head", b)
    assert block.mlp[0] is a and block.head is b
    with pytest.raises(AttributeError):
        replace_module(block, "attn.q_proj", a)


def test_run_block_passes_the_call_and_returns_the_hidden_state():
    block = _Block()
    h = torch.randn(2, 3, 4)
    want = block.head(block.mlp(h)) * 2.0 + 1.0
    assert torch.equal(run_block(block, h, ((2.0,), {"shift": 1.0})), want)
    assert torch.equal(run_block(block, h, ((2.0,), {"shift": 1.0, "as_tuple": False})), want)
