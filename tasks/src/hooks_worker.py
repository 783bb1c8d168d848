"""moeval's hook worker: runs a task's `!function` hooks (Python code) for one moeval process.

moeval starts it once, the first time a hook is needed, as `python -u -c <this file>`, and talks
to it in JSON lines: one request per line on stdin, one reply per line on the original stdout.
Anything else written to stdout (a hook's `print`, C code writing to file descriptor 1) goes to
stderr, so it cannot corrupt the replies. A request carries a whole batch of items; the reply is
`{"ok": [...]}` or `{"error": {...}}` naming the failing item's index and the traceback.

Modules are imported as lm-evaluation-harness imports them (`spec_from_file_location` on the file,
module name = its stem), once per file for the worker's lifetime, with one difference that changes
no result: see `DeferredImports`.
"""

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import traceback


class HookFailed(Exception):
    """A hook failed on batch item `index` (None: the batch as a whole). `stage`: `load` (its
    module or function cannot be had), `raised` (it raised; `text` is the traceback) or `result`
    (it returned something unusable)."""

    def __init__(self, index, text, stage="raised"):
        super().__init__(text)
        self.index = index
        self.text = text
        self.stage = stage


class Missing(Exception):
    """A Python package the request needs is not installed."""


def formatted(exc):
    """The traceback of `exc` from the user's code on: the worker's frame and importlib's
    machinery are dropped."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def invoke(index, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # noqa: B902 (a hook calling sys.exit is an error too)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise HookFailed(index, formatted(e)) from None


# Non-finite floats are not JSON: documents and field values get null (as a missing value),
# scores get these spellings, which moeval reads back as numbers.
NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def plain(v, scores):
    """`v` as JSON values: numpy values and arrays via `tolist`, tuples and sets as lists."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return NONFINITE[repr(v)] if scores else None
    if isinstance(v, dict) or hasattr(v, "keys") and hasattr(v, "__getitem__"):
        return {str(k): plain(v[k], scores) for k in v.keys()}
    if isinstance(v, (list, tuple)):
        return [plain(x, scores) for x in v]
    if hasattr(v, "tolist"):  # numpy (and torch) scalars and arrays
        return plain(v.tolist(), scores)
    if isinstance(v, (set, frozenset)):
        try:
            return [plain(x, scores) for x in sorted(v)]
        except TypeError:
            return [plain(x, scores) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if hasattr(v, "isoformat"):  # datetime, date, time
        return v.isoformat()
    if type(v).__name__ == "Decimal":
        return plain(float(v), scores)
    raise TypeError("a value of type `%s.%s` is not a JSON value" % (type(v).__module__, type(v).__name__))


def encode(items, scores):
    """The JSON text of a list of results; names the item that cannot be sent."""
    try:
        # The fast path: plain Python values (tuples become lists).
        return json.dumps(items, allow_nan=False)
    except (TypeError, ValueError):
        pass
    out = []
    for i, v in enumerate(items):
        try:
            out.append(plain(v, scores))
        except (TypeError, RecursionError) as e:
            raise HookFailed(i, "the hook returned something moeval cannot read: %s" % e, "result") from None
    return json.dumps(out, allow_nan=False)


class DeferredImports(importlib.abc.MetaPathFinder):
    """Defers the hook file's own top-level imports of packages until the hook first uses them.

    Task files import heavy packages for functions a run may never call (truthfulqa's utils loads
    sacrebleu and rouge_score, 1.6 s, for its generation metrics; the mc2 task needs numpy only).
    While a hook file's body runs, a module it names in a plain top-level `import X` (or `from P
    import submodule`) and uses later in the file is bound to a module object whose body runs on
    its first attribute access (importlib's LazyLoader). What stays eager, so nothing observable
    changes: imports inside `try` / `if` / functions (their failures must happen where the file
    catches them), modules the file never names again (imported for their side effects), extension
    and namespace modules, modules already imported, and everything a deferred module imports once
    it runs. A missing package still fails at the import line: its spec is found at once.
    MOEVAL_HOOKS_EAGER_IMPORTS=1 turns this off.
    """

    def __init__(self, path):
        self.names = set()
        if os.environ.get("MOEVAL_HOOKS_EAGER_IMPORTS") == "1":
            return
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
        except (OSError, SyntaxError, ValueError):
            return  # importing the file reports it
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        for st in tree.body:
            if isinstance(st, ast.Import):
                for a in st.names:
                    if (a.asname or a.name.split(".")[0]) in used:
                        parts = a.name.split(".")
                        self.names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            elif isinstance(st, ast.ImportFrom) and st.level == 0 and st.module:
                # Only names that turn out to be submodules are imported, and so deferred.
                self.names.update(st.module + "." + a.name for a in st.names if (a.asname or a.name) in used)

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


class Worker:
    def __init__(self):
        self.modules = {}

    def function(self, req):
        fn = getattr(self.module(req["file"], req["module"]), req["name"], None)
        if not callable(fn):
            raise HookFailed(None, "%s defines no function `%s`" % (req["file"], req["name"]), "load")
        return fn

    def module(self, path, name):
        """The module of hook file `path`, imported once: a failed import is remembered, and raised
        again, so a file's body runs at most once per worker."""
        module = self.modules.get(path)
        if isinstance(module, HookFailed):
            raise module
        if module is None:
            if not os.path.isfile(path):
                raise HookFailed(None, "%s does not exist" % path, "load")
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise HookFailed(None, "Python cannot import %s from %s" % (name, path), "load")
            module = importlib.util.module_from_spec(spec)
            deferred = DeferredImports(path)
            sys.meta_path.insert(0, deferred)
            try:
                spec.loader.exec_module(module)
            except BaseException as e:  # noqa: B902
                if isinstance(e, KeyboardInterrupt):
                    raise
                failed = HookFailed(None, "importing %s raised an exception:\n%s" % (path, formatted(e)), "load")
                self.modules[path] = failed
                raise failed from None
            finally:
                sys.meta_path.remove(deferred)
            self.modules[path] = module
        return module

    def preload(self, req):
        """Imports what the run's hooks will need while moeval loads data and the model. A failure
        is left for the hook's own call to report."""
        if req.get("datasets"):
            try:
                import datasets  # noqa: F401
            except ImportError:
                pass
        for name, path in req["modules"]:
            try:
                self.module(path, name)
            except HookFailed:
                pass
        return "null"

    def process_docs(self, fn, req):
        try:
            import datasets
        except ImportError as e:
            raise Missing(
                "`process_docs` hooks get a `datasets.Dataset`, but this Python (%s) cannot import "
                "`datasets` (%s); install it there (`%s -m pip install datasets`) or point "
                "MOEVAL_PYTHON / --python at the environment that has your task's dependencies"
                % (sys.executable, e, sys.executable)
            ) from None
        ds = datasets.Dataset.from_list(req["docs"])
        out = invoke(None, fn, ds)
        if hasattr(out, "to_list"):
            out = out.to_list()
        elif not isinstance(out, list):
            out = invoke(None, list, out)
        for d in out:
            if not isinstance(d, dict):
                raise HookFailed(None, "the hook returned a `%s` row, not a dict" % type(d).__name__, "result")
        return out, False

    def map(self, fn, req):
        return [invoke(i, fn, d) for i, d in enumerate(req["docs"])], False

    def process_results(self, fn, req):
        out = []
        for i, (doc, results) in enumerate(req["items"]):
            r = invoke(i, fn, doc, results)
            if not (isinstance(r, dict) or hasattr(r, "keys")):
                raise HookFailed(i, "the hook returned a `%s`, not a dict" % type(r).__name__, "result")
            out.append(r)
        return out, True

    def metric(self, fn, req):
        kwargs = req.get("kwargs") or {}
        out = []
        for i, (gold, result) in enumerate(req["items"]):
            # As lm-evaluation-harness calls a metric: keywords first, then one [gold, result] list
            # for functions that take a single argument.
            try:
                out.append(fn(references=[gold], predictions=[result], **kwargs))
                continue
            except TypeError as e:
                first = formatted(e)
            except BaseException as e:  # noqa: B902
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise HookFailed(i, formatted(e)) from None
            try:
                out.append(fn([gold, result]))
            except BaseException as e:  # noqa: B902
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise HookFailed(
                    i,
                    "called as %s(references=[gold], predictions=[result], **kwargs):\n%s"
                    "then as %s([gold, result]):\n%s" % (req["name"], first, req["name"], formatted(e)),
                ) from None
        return out, True

    def aggregation(self, fn, req):
        return invoke(None, fn, req["items"]), True

    def filter(self, fn, req):
        if "class_kwargs" in req:
            # A filter class (`function: !function m.Class` with keyword arguments).
            instance = invoke(None, fn, **req["class_kwargs"])
            out = invoke(None, instance.apply, req["resps"], req["docs"])
        else:
            out = invoke(None, fn, req["resps"], req["docs"])
        if not isinstance(out, list):
            out = invoke(None, list, out)
        return out, False

    def handle(self, req):
        if req["op"] == "preload":
            return self.preload(req)
        op = getattr(self, req["op"], None)
        if op is None or req["op"] not in OPS:
            raise HookFailed(None, "moeval asked for an unknown operation `%s`" % req["op"], "result")
        fn = self.function(req)
        out, scores = op(fn, req)
        if req["op"] == "aggregation":
            return encode([out], scores)[1:-1]
        return encode(out, scores)


OPS = {"process_docs", "map", "process_results", "metric", "aggregation", "filter"}


def main():
    # Replies use a private copy of stdout; fd 1 and sys.stdout now point at stderr.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.dont_write_bytecode = True

    def reply(text):
        replies.write(text)
        replies.write("\n")
        replies.flush()

    reply(json.dumps({"ready": True, "python": sys.version.split()[0], "executable": sys.executable}))
    worker = Worker()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply('{"ok": %s}' % worker.handle(req))
        except HookFailed as e:
            reply(json.dumps({"error": {"index": e.index, "stage": e.stage, "text": e.text}}))
        except Missing as e:
            reply(json.dumps({"error": {"index": None, "stage": "missing", "text": str(e)}}))
        except Exception as e:  # the worker's own failure: still answer, with its traceback
            text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            reply(json.dumps({"error": {"index": None, "stage": "worker", "text": text}}))


main()
