"""The size of the trusted computing base: code lines per layer and of the supervisor's import closure.

A code line is a line holding a token of code: blank lines, comments and docstrings do not count (read with
``tokenize`` and ``ast``). The supervisor's import closure is measured by importing
``dcr_enclave.runtime.supervisor`` in a fresh isolated interpreter and counting every ``dcr_enclave`` module
it loaded. Targets: the closure at most 3,500 code lines, no ``runtime/`` module over 400.

    python benchmarks/tcb_size.py [--json]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

import dcr_enclave

PACKAGE = Path(dcr_enclave.__file__).parent
LAYERS = ("formats", "runtime", "verify", "platform", "pack", "commands")
CLOSURE_TARGET = 3500
RUNTIME_MODULE_TARGET = 400
_SKIP = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def code_lines(path: Path) -> int:
    source = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            if is_doc and isinstance(first.value.value, str) and first.end_lineno is not None:
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _SKIP:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def supervisor_closure() -> list[Path]:
    code = (
        f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        "import json, dcr_enclave.runtime.supervisor\n"
        "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('dcr_enclave') and getattr(m, '__file__', None))))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return [Path(p) for p in json.loads(out)]


def report() -> dict:
    layers = {}
    for layer in LAYERS:
        modules = {
            p.relative_to(PACKAGE).as_posix(): code_lines(p) for p in sorted((PACKAGE / layer).rglob("*.py"))
        }
        layers[layer] = {"code_lines": sum(modules.values()), "modules": modules}
    closure = {p.relative_to(PACKAGE).as_posix(): code_lines(p) for p in supervisor_closure()}
    runtime = layers["runtime"]["modules"]
    largest = max(runtime, key=runtime.__getitem__)
    return {
        "layers": layers,
        "supervisor_closure": {"code_lines": sum(closure.values()), "modules": closure},
        "largest_runtime_module": {"module": largest, "code_lines": runtime[largest]},
        "targets": {"closure": CLOSURE_TARGET, "runtime_module": RUNTIME_MODULE_TARGET},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args()
    r = report()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{'layer':<10} {'code lines':>10}  modules")
    for layer, info in r["layers"].items():
        print(f"{layer:<10} {info['code_lines']:>10}  {len(info['modules'])}")
    total = sum(info["code_lines"] for info in r["layers"].values())
    print(f"{'all':<10} {total:>10}")
    closure = r["supervisor_closure"]
    ok = closure["code_lines"] <= CLOSURE_TARGET
    print(
        f"\nsupervisor import closure: {closure['code_lines']} code lines in {len(closure['modules'])} modules "
        f"(target <= {CLOSURE_TARGET}: {'met' if ok else 'NOT met'})"
    )
    for module, n in sorted(closure["modules"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:>5}  {module}")
    big = r["largest_runtime_module"]
    ok_module = big["code_lines"] <= RUNTIME_MODULE_TARGET
    print(
        f"\nlargest runtime module: {big['module']} with {big['code_lines']} code lines "
        f"(target <= {RUNTIME_MODULE_TARGET}: {'met' if ok_module else 'NOT met'})"
    )
    return 0 if ok and ok_module else 1


if __name__ == "__main__":
    raise SystemExit(main())
