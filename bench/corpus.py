"""A realistic corpus of English search-result events built from real text that every Python install carries.

Nobody typed these: each result's title, snippet and content come from the standard library's own documentation —
the language reference topics `pydoc` shows (`pydoc_data.topics`) and the docstrings of the stdlib's modules and of
their public classes and functions, read from the source with `ast` (nothing is imported: no side effects, no
output, no network). Each event is a query a user might type about one subject (a module, a class, a function or a
language topic) and 3–8 results about it and related subjects (the same module's other names, the module itself,
documents that mention it, now and then an unrelated hit), with docs.python.org- and GitHub-like URLs, so packing
and citations are exercised on real prose and code excerpts. Seeded: the same seed on the same Python version gives
the same events with the same ids (docstrings change between Python versions; `corpus_digest` tells two builds apart).

    python bench/corpus.py --events 600 --out corpus.jsonl     # one event's JSON per line: `python -m processor produce` reads it
    from bench.corpus import corpus_events; events = corpus_events(600, seed=0)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import inspect
import json
import random
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

COLLECTED = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
MIN_SUBJECT_CHARS = 200  # a subject needs a docstring with something to summarise
MIN_RESULT_CHARS = 60
SNIPPET_CHARS = 260
# GUI and packaging modules: their sources are there, but skipped so that hosts with and without Tk agree.
SKIP_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip", "lib2to3"})
_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class Doc:
    key: str  # unique: "topic:assert", "module:json", "json.dumps"
    kind: str  # topic | module | class | function
    name: str  # what a user calls it: "assert", "json", "json.dumps"
    module: str  # the module it belongs to ("" for a topic)
    title: str
    url: str
    text: str  # the real text, whitespace collapsed


def _clean(text: str) -> str:
    return _SPACE.sub(" ", inspect.cleandoc(text)).strip()


def _topic_docs() -> list[Doc]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        lines = [line for line in topics[key].splitlines() if line.strip()]
        if len(lines) < 3:
            continue
        heading = lines[0].strip()
        body = " ".join(line for line in lines[1:] if not set(line.strip()) <= set("*=-"))
        heading_words = heading.replace('"', "").replace("'", "")
        docs.append(Doc(f"topic:{key}", "topic", heading_words, "", f"{heading} — Python language reference",
                        f"https://docs.python.org/3/reference/topics.html#{key}", _clean(body)))
    return docs


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
    if node.args.vararg:
        args.append("*" + node.args.vararg.arg)
    args += [a.arg for a in node.args.kwonlyargs]
    if node.args.kwarg:
        args.append("**" + node.args.kwarg.arg)
    return f"({', '.join(args)})"


def _module_docs(name: str) -> list[Doc]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []  # built-in or C extension: no source to read
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    page = f"https://docs.python.org/3/library/{name}.html"
    origin = Path(spec.origin)
    source = f"https://github.com/python/cpython/blob/main/Lib/{name}/__init__.py" if origin.name == "__init__.py" \
        else f"https://github.com/python/cpython/blob/main/Lib/{origin.name}"
    docs = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= MIN_RESULT_CHARS:
        first = _clean(doc).split(". ")[0][:80]
        docs.append(Doc(f"module:{name}", "module", name, name, f"{name} — {first}", page, _clean(doc)))
        docs.append(Doc(f"source:{name}", "source", name, name, f"cpython/Lib/{name} at main · python/cpython", source,
                        _clean(doc)))
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_RESULT_CHARS:
            continue
        qualified = f"{name}.{node.name}"
        if isinstance(node, ast.ClassDef):
            docs.append(Doc(qualified, "class", qualified, name, f"class {qualified} — {name} documentation",
                            f"{page}#{qualified}", _clean(doc)))
        else:
            docs.append(Doc(qualified, "function", qualified, name, f"{qualified}{_signature(node)} — {name} documentation",
                            f"{page}#{qualified}", _clean(doc)))
    if docs and docs[0].kind == "module":
        # A library page holds the module's text and then every documented name's, as docs.python.org's pages do.
        page_text = " ".join([docs[0].text, *(f"{d.title.split(' — ')[0]}: {d.text}" for d in docs[2:])])
        docs[0] = Doc(docs[0].key, "module", name, name, docs[0].title, page, page_text)
    return docs


@lru_cache(maxsize=1)
def collect_docs() -> tuple[Doc, ...]:
    """Every document the corpus draws on, in a fixed order."""
    docs = _topic_docs()
    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in SKIP_MODULES:
            docs.extend(_module_docs(name))
    return tuple(docs)


def _snippet(text: str) -> str:
    if len(text) <= SNIPPET_CHARS:
        return text
    cut = text[:SNIPPET_CHARS]
    return cut[: cut.rfind(" ")].rstrip(" ,;:") + " ..."


def _content(text: str, rng: random.Random) -> str | None:
    if rng.random() < 0.25:
        return None  # many search results come with a snippet only
    limit = rng.choice((600, 1200, 2500, 5000, 12000, 10**6))  # the last: the whole page, as a scraper keeps it
    if len(text) <= limit:
        return text
    ends = [m.start() for m in _SENTENCE_END.finditer(text, 0, limit)]
    return text[: ends[-1]] if ends and ends[-1] > limit // 2 else text[:limit]


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _query(doc: Doc, sibling: Doc | None, rng: random.Random) -> str:
    short, module = _short(doc.name), doc.module
    if doc.kind == "topic":
        subject = doc.name.lower()
        templates = [f"python {subject}", f"how does {subject} work in python", f"{subject} python explained",
                     f"what is {subject} in python 3", f"python docs {subject} example"]
    elif doc.kind in ("module", "source"):
        templates = [f"python {module} module", f"what is the {module} module used for", f"how to use {module} in python",
                     f"{module} python tutorial", f"python {module} example code", f"import {module} python docs"]
    elif doc.kind == "class":
        templates = [f"python {doc.name} class", f"{short} class in {module} python", f"how to use {doc.name}",
                     f"{doc.name} methods", f"what is {short} python {module}"]
    else:
        templates = [f"python {doc.name} example", f"what does {doc.name} do", f"{doc.name} arguments",
                     f"how to use {short} from {module}", f"{module} {short} return value"]
    if sibling is not None and sibling.kind in ("class", "function"):
        templates.append(f"{doc.name} vs {sibling.name}")
        templates.append(f"difference between {short} and {_short(sibling.name)} in python")
    return rng.choice(templates)


class _Index:
    def __init__(self, docs: tuple[Doc, ...]) -> None:
        self.docs = docs
        self.by_module: dict[str, list[Doc]] = {}
        for doc in docs:
            if doc.module:
                self.by_module.setdefault(doc.module, []).append(doc)
        self.topics = [d for d in docs if d.kind == "topic"]

    def related(self, doc: Doc, rng: random.Random) -> list[Doc]:
        """Candidates for the other results: the module's other names and the module itself, then documents that
        mention the subject (searched in a sample, to stay fast)."""
        pool = [d for d in self.by_module.get(doc.module, []) if d.key != doc.key]
        if doc.kind == "topic":
            words = {w for w in re.findall(r"[a-z]{4,}", doc.name.lower())} - {"statement", "python", "the"}
            pool = [t for t in self.topics if t.key != doc.key and words & set(re.findall(r"[a-z]{4,}", t.name.lower()))]
        rng.shuffle(pool)
        needle = re.compile(rf"\b{re.escape(_short(doc.name))}\b")
        mentions = [d for d in rng.sample(self.docs, min(250, len(self.docs)))
                    if d.key != doc.key and d.module != doc.module and needle.search(d.text)]
        return pool[:6] + mentions[:3]


def corpus_events(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct English search-result events (dicts in the input contract, valid for validate_event)."""
    index = _Index(collect_docs())
    rng = random.Random(seed)
    subjects = [d for d in index.docs if len(d.text) >= MIN_SUBJECT_CHARS and d.kind != "source"]
    rng.shuffle(subjects)
    events: list[dict[str, Any]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    attempts = 0
    while len(events) < n and attempts < 20 * n:
        doc = subjects[attempts % len(subjects)]
        attempts += 1
        related = index.related(doc, rng)
        count = rng.randint(3, 8)
        others = related[: count - 1]
        while len(others) < count - 1:  # search noise: an unrelated hit fills the page
            extra = rng.choice(index.docs)
            if extra.key != doc.key and extra not in others:
                others.append(extra)
        page = [doc, *others]
        if rng.random() < 0.3:  # the best answer is not always ranked first
            page[0], page[1] = page[1], page[0]
        sibling = next((d for d in related if d.kind == doc.kind and d.module == doc.module), None)
        query = _query(doc, sibling, rng)
        identity = (query, tuple(d.key for d in page))
        if identity in seen:
            continue
        seen.add(identity)
        slug = re.sub(r"[^a-z0-9]+", "-", doc.key.lower()).strip("-")[:48]
        events.append({
            "event_id": f"corpus-{seed}-{len(events):04d}-{slug}",
            "query": query,
            "language": "en",
            "search_engine": "corpus-stdlib-docs",
            "collected_at": (COLLECTED + timedelta(seconds=37 * len(events))).isoformat(),
            "results": [
                {"rank": rank, "title": d.title, "url": d.url, "snippet": _snippet(d.text), "content": _content(d.text, rng)}
                for rank, d in enumerate(page, start=1)
            ],
        })
    if len(events) < n:
        raise ValueError(f"only {len(events)} distinct events could be built from this Python's documentation")
    return events


def corpus_digest(events: list[dict[str, Any]]) -> str:
    """A short hash of the events: equal on two hosts when they built the same corpus."""
    return hashlib.sha256(json.dumps(events, sort_keys=True).encode()).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a JSON-lines file, one event per line ('-': stdout)")
    args = parser.parse_args()
    events = corpus_events(args.events, seed=args.seed)
    lines = "".join(json.dumps(event, ensure_ascii=False) + "\n" for event in events)
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        Path(args.out).write_text(lines, encoding="utf-8")
    results = [len(e["results"]) for e in events]
    print(f"{len(events)} events, {sum(results)} results ({min(results)}–{max(results)} per event), "
          f"Python {sys.version.split()[0]}, digest {corpus_digest(events)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
