"""The shape of tfmbgd's imports: cycles among its modules and the longest import chain.

    python tools/import_graph.py            # prints both; exit 1 on a cycle or a chain over LIMIT

How it counts: grimp (import-linter's graph) lists every `import` of every tfmbgd module,
those inside functions included. A module's *depth* is 1 for a module that imports no
other tfmbgd module, else 1 + the largest depth of the tfmbgd modules it imports (a
package's `__init__` is a module like the others). The depth of the package is that of
its deepest module: the number of modules on its longest chain of imports. A cycle is a
strongly connected component of two or more modules (or a module that imports itself).

The chain is one module per abstraction a call goes down through (the entry point
`python -m tfmbgd`, its command line, launch, study, the run,
the runner, the step, the panel, the registry, an instrument, the Hessian, the moments,
the layer-wise method, the gradients, the losses, the errors), so LIMIT is today's depth,
a guard against a deeper stack; the floors it crosses are at most the eight layers of the
`layers` contract in setup.cfg.
"""

import functools
import sys

import grimp

LIMIT = 17      # 16 until the command line moved into the package (app.main, __main__)


def graph(package="tfmbgd"):
    """`{module: set of tfmbgd modules it imports}`."""
    g = grimp.build_graph(package, include_external_packages=False, cache_dir=None)
    return {m: set(g.find_modules_directly_imported_by(m)) for m in sorted(g.modules)}


def cycles(imports):
    """The strongly connected components of two or more modules (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in imports[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in imports[v]:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in imports:
        if v not in index:
            visit(v)
    return out


def chain(imports):
    """The longest chain of imports, as a list of modules (the first imports the second, ...);
    the graph must have no cycle."""
    @functools.cache
    def longest(v):
        best = max((longest(w) for w in imports[v]), key=len, default=())
        return (v, *best)
    return list(max((longest(v) for v in imports), key=len))


def main():
    imports = graph()
    found = cycles(imports)
    for component in found:
        print("cycle: " + " <-> ".join(component))
    if found:
        return 1
    longest = chain(imports)
    print(f"{len(imports)} modules, no import cycle; the longest chain of imports has {len(longest)} "
          f"modules (at most {LIMIT}):")
    print("  " + "\n  -> ".join(longest))
    return 0 if len(longest) <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
