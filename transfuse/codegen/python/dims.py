"""Symbolic dims as Python integer expressions, for the generated code.

``DimPrinter(symbol_name)(d)`` writes a dim (an int or a sympy expression over named
symbols) as exact integer Python: ``floor(seq/2)`` -> ``seq // 2``, ``ceiling(x/4)`` ->
``-(-x // 4)``, ``Max(a, b)`` -> ``max(a, b)``. ``symbol_name`` maps a symbol to the
local the generated function binds it to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy

from transfuse.errors import LoweringError
from transfuse.ir.types import Dim


class DimPrinter:
    """Sympy dims as Python integer expressions (``floor(seq/2)`` -> ``seq // 2``)."""

    def __init__(self, symbol_name: Callable[[str], str]):
        self.symbol_name = symbol_name

    def __call__(self, d: Dim) -> str:
        text, _ = self.expr(d)
        return text

    def expr(self, d: Any) -> tuple[str, bool]:
        """(text, is_atom)."""
        if isinstance(d, int):
            return str(d), d >= 0
        e = sympy.sympify(d)
        if e.is_Integer:
            return str(int(e)), int(e) >= 0
        if e.is_Symbol:
            return self.symbol_name(e.name), True
        num, den = sympy.fraction(sympy.together(e))
        if den != 1 and not isinstance(e, (sympy.floor, sympy.ceiling)):
            # an integer-valued expression with rational coefficients: exact floor division
            return f"{self.atom(num)} // {self.atom(den)}", False
        if isinstance(e, sympy.floor):
            return self._div(e.args[0], ceil=False)
        if isinstance(e, sympy.ceiling):
            return self._div(e.args[0], ceil=True)
        if isinstance(e, sympy.Add):
            terms = sorted(e.args, key=lambda t: (t.is_number, sympy.default_sort_key(t)))
            out = self.atom_or_mul(terms[0])
            for t in terms[1:]:
                if t.could_extract_minus_sign():
                    out += f" - {self.atom_or_mul(-t)}"
                else:
                    out += f" + {self.atom_or_mul(t)}"
            return out, False
        if isinstance(e, sympy.Mul):
            coeff, rest = e.as_coeff_Mul()
            factors = sympy.Mul.make_args(rest)
            text = "*".join(self.atom(f) for f in factors)
            if coeff == -1:
                return f"-{text}", False
            if coeff != 1:
                text = f"{self.atom(coeff)}*{text}"
            return text, False
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            return f"{self.atom(e.base)}**{int(e.exp)}", False
        if isinstance(e, sympy.Mod):
            return f"{self.atom(e.args[0])} % {self.atom(e.args[1])}", False
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = "max" if isinstance(e, sympy.Max) else "min"
            return f"{fn}({', '.join(self(a) for a in e.args)})", True
        raise LoweringError(f"python backend: cannot write dimension {e} as Python")

    def _div(self, arg: Any, ceil: bool) -> tuple[str, bool]:
        num, den = sympy.fraction(sympy.together(arg))
        if den == 1:
            return self.expr(num)
        if ceil:
            return f"-(-{self.atom(num)} // {self.atom(den)})", False
        return f"{self.atom(num)} // {self.atom(den)}", False

    def atom(self, d: Any) -> str:
        text, is_atom = self.expr(d)
        return text if is_atom else f"({text})"

    def atom_or_mul(self, d: Any) -> str:
        text, is_atom = self.expr(d)
        if is_atom or isinstance(d, sympy.Mul) and not text.startswith("-"):
            return text
        return f"({text})"


__all__ = ["DimPrinter"]
