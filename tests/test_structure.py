"""The package's structure: no import cycles between growjax modules (each concept has one home and
dependencies point one way), found by reading every module's imports, those inside functions too."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph() -> dict[str, set[str]]:
    """{module: growjax modules it imports}; a module's imports of its parent packages are left out
    (Python runs a package's __init__ first anyway)."""
    paths = {}
    for folder, _, files in os.walk(os.path.join(REPO, 'growjax')):
        for file in files:
            if file.endswith('.py'):
                path = os.path.join(folder, file)
                paths[os.path.relpath(path, REPO)[:-3].replace(os.sep, '.').removesuffix('.__init__')] = path
    graph = {}
    for name, path in paths.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('growjax'):
                imported |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {m for m in imported & set(paths) if m != name and not name.startswith(m + '.')}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_growjax_has_no_import_cycles():
    graph = import_graph()
    assert {'growjax.train', 'growjax.analysis', 'growjax.analysis.cli', 'growjax.data.tfdata'} <= set(graph)
    assert cycles(graph) == []


def test_the_training_job_does_not_know_the_analyses():
    assert not any(m.startswith('growjax.analysis') for m in import_graph()['growjax.train'])
