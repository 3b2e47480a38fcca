#!/usr/bin/python3
"""The docs must say what the code does: names, paths and options they cite
must exist. Standard library only.

  tests/docs_test.py --cli DMREMAP --server DMREMAP_SERVER --plugin DMREMAP_SO \\
      --catch DMREMAP_TESTS --build-dir BUILD

ctest runs it as `docs_test` with the built binaries. Each failure is one
line, FILE:LINE: what is wrong; the exit status is 1 if there is any. -v
lists every citation checked. A rule that finds nothing to check fails too:
the docs have such citations, so the rule, not the docs, has broken.

"The docs" are README.md, examples/README.md and docs/*.md. Inline code is a
backticked span, which may run over a line break inside a paragraph or a
table cell; a fence is a ``` block, read line by line (a line ending in a
backslash, or an indented line in an untyped or shell fence, continues the
line before).

a. Documents cited anywhere. In every text file of the repository (sources,
   scripts, CMake files, examples, the docs; not build/, demo/, fuzz/corpus/),
   a token ending in ".md" must name a file: relative to the citing file's
   directory, or to the repository's root (leading "../" dropped), or, for a
   bare name, in docs/. So must a token starting with "examples/". proto.md,
   the NBD protocol's own document, is the one outside name. In the docs, a
   Markdown link's target must exist relative to the page, and its #anchor
   must be a heading of the target page.

b. Tests cited in the docs, in inline code:
   - `e2e NAME`: tests/e2e/NAME.py must exist; methods cited after it in the
     same paragraph or table cell belong to it.
   - one identifier ending in "_test" or starting with "e2e_" (in
     docs/behaviour.md, the page of rules and their tests, any lowercase
     snake_case identifier): a ctest name of BUILD (read from its
     CTestTestfile.cmake files) or an e2e module.
   - a span right after the word "ctest": a ctest name (each Catch2 test
     case is one), or, ending in "...", the start of one.
   - `test_NAME` (or `test_PREFIX...`): a method of the e2e module cited
     last before it in the paragraph or cell, or of any e2e module if none.
   - `module_test.Class[.test_method]`, and a CamelCase identifier ending in
     "Test": an e2e class (and method).
   - Catch2 (`dmremap_tests --list-test-names-only`): a span that starts with
     the family of a test case (the words before the first ": " of its name,
     such as "reads 7", "journal", "format 1 to 2") followed by ": " is a
     citation. It must be a test case's whole name, or, ending in "...", the
     start of one. A span with a sentence break in it (". " or "? " before a
     capital) is a quoted message, not a citation, so the engine's error
     "spare: holds no valid dmremap superblock (not formatted?). Format it
     ..." is not taken for a test of the "spare" family.
   - In a table whose header has a "test" or "tests" column, every span of
     that column outside parentheses must be one of the above, a path or
     file name, or a Catch2 name without a family. Inside the parentheses
     that follow a Catch2 citation there, a "double-quoted" string must be a
     SECTION of tests/*.cc; after `cli_test` (in parentheses or after a
     colon), one of cli_test.sh's checks.

c. Paths in inline code and fences: a token starting with scripts/, tests/,
   bench/, fuzz/, examples/, tools/, lib/, server/, plugin/ or docs/ (after
   "./") must exist (a glob must match; with "..." its directory must exist).
   A token starting with build/ must name a build directory that scripts/*
   make (build/release, build/test, ...), so `build/plugin/dmremap.so` fails;
   under it, SRCDIR/FILE must be a file that SRCDIR/CMakeLists.txt builds
   (an executable, or a module's OUTPUT_NAME with its suffix). A bare file
   name ending in .cc, .h, .py or .sh must be a file somewhere in the
   repository.

d. Options. A command in inline code or on a fence line belongs to the
   program named at its start (after "$ " and VAR=value; a word starting
   with # ends it), or to the one named later in it: `dmremap`, `dmremap-server`, nbdkit and the NBD and qemu tools
   switch it; `[ dmremap-server ... ]` (libnbd's syntax) switches it inside
   the brackets; after `nbdkit`, `dmremap` or a path ending in dmremap.so is
   the plugin. Options are then checked against the program that has them:
   - `dmremap [SUB]`: each --option must be in `dmremap --help` or, when the
     first word after it is a subcommand, in `dmremap SUB --help`;
   - `dmremap-server`: in `dmremap-server --help`;
   - the plugin: each key= after it must be a key `nbdkit PLUGIN --help`
     lists.
   Options of any other program (nbdkit's own, qemu's, nbd-client's, fio's,
   nbdinfo's) are never checked. A span that starts with an option names no
   program: in docs/cli.md it belongs to `dmremap` and the subcommand of its
   section (a "## `dmremap SUB ...`" heading; or the subcommand the span
   starts with), in docs/server.md to dmremap-server, elsewhere to nobody.
   Every key= that starts a line of docs/plugin.md's "Parameters" section,
   and every key= in README.md's "Plugin parameters:" paragraph, must be a
   key of the plugin.
"""
import argparse
import ast
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "build", "demo", "__pycache__", os.path.join("fuzz", "corpus")}
TEXT_EXTS = {".cc", ".h", ".py", ".sh", ".md", ".txt", ".cmake", ".service", ".socket"}
EXTERNAL_DOCS = {"proto.md"}  # the NBD protocol's doc/proto.md
REPO_PREFIXES = ("scripts/", "tests/", "bench/", "fuzz/", "examples/", "tools/", "lib/",
                 "server/", "plugin/", "docs/")
FOREIGN_PROGRAMS = {"nbdkit", "nbdinfo", "nbdcopy", "nbdsh", "nbd-client", "qemu-img", "qemu-io",
                    "qemu-nbd", "qemu-system-x86_64", "fio"}
OUR_PROGRAMS = {"dmremap": "cli", "dmremap-server": "server"}
SENTENCE_BREAK = re.compile(r"[.?!]\s+[A-Z]")

failures = []
counts = {}
VERBOSE = False


def fail(path, line, message):
    failures.append(f"{os.path.relpath(path, ROOT)}:{line}: {message}")


def count(what, path, line, text):
    counts[what] = counts.get(what, 0) + 1
    if VERBOSE:
        print(f"  {os.path.relpath(path, ROOT)}:{line}: {what}: {norm(str(text))}")


def norm(text):
    return " ".join(text.replace("\\|", "|").split())


def run(argv):
    try:
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        fail(__file__, 1, f"cannot run {' '.join(argv)}: {e}")
        return ""


# ---- What the code has ----------------------------------------------------

def e2e_suites():
    """{module: {class: {methods}}} of tests/e2e/*_test.py, read with ast."""
    suites = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "e2e", "*_test.py"))):
        try:
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
        except SyntaxError as e:
            fail(path, e.lineno or 1, f"cannot read its tests: {e.msg}")
            continue
        classes = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = {f.name for f in node.body if isinstance(f, ast.FunctionDef)
                                      and f.name.startswith("test")}
        suites[os.path.basename(path)[:-3]] = classes
    return suites


def ctest_list(build_dir):
    """ctest names, from the build tree's CTestTestfile.cmake files. (Not
    `ctest -N`: it rewrites Testing/Temporary/LastTest.log, which the ctest
    that runs this test is writing.)"""
    names, todo, seen = set(), [os.path.join(build_dir, "CTestTestfile.cmake")], set()
    while todo:
        path = os.path.abspath(todo.pop())
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        text = open(path, encoding="utf-8").read()
        here = os.path.dirname(path)
        name = r'add_test\(\s*(?:\[(=*)\[(.*?)\]\1\]|"([^"]*)"|([^\s)]+))'
        for m in re.finditer(name, text, re.S):
            names.add(m.group(2) if m.group(2) is not None else m.group(3) or m.group(4))
        todo += [os.path.join(here, d, "CTestTestfile.cmake")
                 for d in re.findall(r'subdirs\("([^"]+)"\)', text)]
        todo += [os.path.join(here, f) for f in re.findall(r'include\("([^"]+)"\)', text)]
    return names


def cli_checks():
    text = open(os.path.join(ROOT, "tests", "cli_test.sh"), encoding="utf-8").read()
    return {norm(m) for m in re.findall(r'\b(?:expect|contains|pass|flunk|equals)\s+"([^"$]+)"',
                                         text)}


def catch_sections():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "*.cc")):
        text = open(path, encoding="utf-8").read()
        names |= {norm(m) for m in re.findall(r'SECTION\(\s*"((?:[^"\\]|\\.)*)"', text)}
    return names


def cli_options(cli):
    """({top-level options}, {subcommand: {options}}) from the CLI's --help."""
    def options(help_text):
        found = set()
        for line in help_text.splitlines():
            m = re.match(r"^  (-\S+)", line)
            if m:
                found |= {o for o in m.group(1).split(",") if o.startswith("--")}
        return found
    top = run([cli, "--help"])
    subs, in_subs = {}, False
    for line in top.splitlines():
        if line.startswith("Subcommands:"):
            in_subs = True
        elif in_subs and re.match(r"^  [a-z]", line):
            name = line.split()[0]
            subs[name] = options(run([cli, name, "--help"]))
        elif in_subs and line and not line.startswith(" "):
            in_subs = False
    return options(top), subs


def server_options(server):
    found = set()
    for line in run([server, "--help"]).splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            found |= {o for o in m.group(1).split(",") if o.startswith("--")}
    return found


def plugin_keys(plugin):
    return {m.group(1) for line in run(["nbdkit", plugin, "--help"]).splitlines()
            if (m := re.match(r"^([a-z][a-z0-9-]*)=", line))}


def build_dirs():
    """The build directories scripts/* make: build/NAME."""
    dirs = set()
    for path in glob.glob(os.path.join(ROOT, "scripts", "*")):
        text = open(path, encoding="utf-8").read()
        # build/NAME itself, not $build/NAME (a directory inside one).
        dirs |= set(re.findall(r"(?<![\w$/.])build/([A-Za-z0-9_.-]+)", text))
    return dirs


def cmake_outputs(srcdir):
    """File names that srcdir/CMakeLists.txt builds, or None if there is none."""
    path = os.path.join(ROOT, srcdir, "CMakeLists.txt")
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read()
    names = set(re.findall(r"add_executable\(\s*([\w.-]+)", text))
    for name, kind in re.findall(r"add_library\(\s*([\w.-]+)\s+(MODULE|SHARED|STATIC)", text):
        m = re.search(r"set_target_properties\(\s*" + re.escape(name) + r"\b[^)]*\)", text)
        props = m.group(0) if m else ""
        out = re.search(r"OUTPUT_NAME\s+([\w.-]+)", props)
        stem = out.group(1) if out else name
        prefix = "" if re.search(r'PREFIX\s+""', props) else "lib"
        names.add(prefix + stem + (".a" if kind == "STATIC" else ".so"))
    return names


# ---- Reading Markdown -----------------------------------------------------

class Unit:
    """A paragraph, a heading or a table cell: text, first line, context."""

    def __init__(self, path, line, text, section, column=None):
        self.path, self.line, self.text = path, line, text
        self.section, self.column = section, column

    def spans(self):
        """(line, text, start, end) of each inline code span."""
        for m in re.finditer(r"`([^`]+)`", self.text):
            yield self.line + self.text.count("\n", 0, m.start()), m.group(1), m.start(), m.end()


def split_cells(row):
    cells, cur, i = [], "", 0
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    while i < len(row):
        if row[i] == "\\" and i + 1 < len(row) and row[i + 1] == "|":
            cur += "\\|"
            i += 2
            continue
        if row[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += row[i]
        i += 1
    cells.append(cur)
    return cells


def read_markdown(path):
    """(units, fence_lines, headings): units as above; fence lines as
    (line, text, language, section) with continuations joined."""
    lines = open(path, encoding="utf-8").read().split("\n")
    units, fences, headings = [], [], set()
    section = ""
    para, para_line = [], 0
    header = None
    fence_lang = None
    pending = None  # a fence line being continued: [line, text]

    def flush_para():
        nonlocal para
        if para:
            units.append(Unit(path, para_line, "\n".join(para), section))
        para = []

    for n, line in enumerate(lines, 1):
        if fence_lang is not None:
            if line.startswith("```"):
                if pending:
                    fences.append((pending[0], pending[1], fence_lang, section))
                pending, fence_lang = None, None
                continue
            shellish = fence_lang in ("", "sh", "shell", "console")
            if pending and (pending[1].endswith("\\") or (shellish and line[:1] in (" ", "\t")
                                                         and line.strip())):
                pending[1] = pending[1].rstrip("\\") + " " + line.strip()
                continue
            if pending:
                fences.append((pending[0], pending[1], fence_lang, section))
            pending = [n, line] if line.strip() else None
            continue
        if line.startswith("```"):
            flush_para()
            fence_lang = line[3:].strip()
            continue
        if re.match(r"^#{1,6} ", line):
            flush_para()
            header = None
            if re.match(r"^##? ", line):  # a ### section belongs to its ## one
                section = line
            title = line.lstrip("#").strip()
            headings.add(slug(title))
            units.append(Unit(path, n, title, section))
            continue
        if line.startswith("|"):
            flush_para()
            cells = split_cells(line)
            if all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
                continue
            if header is None:
                header = [c.strip().lower() for c in cells]
            for i, cell in enumerate(cells):
                column = header[i] if i < len(header) else ""
                units.append(Unit(path, n, cell, section, column))
            continue
        header = None
        if not line.strip():
            flush_para()
            continue
        if not para:
            para_line = n
        para.append(line)
    flush_para()
    return units, fences, headings


def slug(title):
    """GitHub's anchor for a heading."""
    title = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower())
    return title.replace(" ", "-")


def doc_files():
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "examples", "README.md")]
    return files + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


# ---- a. Documents cited anywhere -------------------------------------------

def repo_files():
    """The repository's own files: not build trees, demo data or corpora."""
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS
                       and os.path.normpath(os.path.join(rel, d)) not in SKIP_DIRS]
        for name in filenames:
            yield os.path.join(dirpath, name)


def repo_text_files():
    for path in repo_files():
        name, rel = os.path.basename(path), os.path.relpath(os.path.dirname(path), ROOT)
        if os.path.splitext(name)[1] in TEXT_EXTS or name == "CMakeLists.txt" \
                or rel in ("scripts", ".ci"):
            yield path


def check_cited_documents():
    for path in repo_text_files():
        here = os.path.dirname(path)
        for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
            line = re.sub(r"[a-z]+://\S+", "", line)
            md = r"(?<![\w@.-])((?:\.{1,2}/)*(?:[\w@.-]+/)*[\w@-][\w@.-]*\.md)\b"
            for token in re.findall(md, line):
                if os.path.basename(token) in EXTERNAL_DOCS:
                    continue
                count("documents cited", path, n, token)
                bare = re.sub(r"^(\.{1,2}/)+", "", token)
                candidates = [os.path.join(here, token), os.path.join(ROOT, bare)]
                if "/" not in token:
                    candidates.append(os.path.join(ROOT, "docs", token))
                if not any(os.path.isfile(c) for c in candidates):
                    fail(path, n, f"cites {token}, which does not exist")
            for token in re.findall(r"(?<![\w/.-])(examples/[\w@.-]*)", line):
                token = token.rstrip(".")
                count("documents cited", path, n, token)
                if not os.path.exists(os.path.join(ROOT, token)):
                    fail(path, n, f"cites {token}, which does not exist")


def check_links(path, units, headings_of):
    for unit in units:
        text = re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), unit.text)
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            line = unit.line + text.count("\n", 0, m.start())
            count("links", path, line, target)
            file_part, _, anchor = target.partition("#")
            dest = path
            if file_part:
                dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if not os.path.exists(dest):
                fail(path, line, f"link to {target}: {file_part} does not exist")
            elif anchor and dest.endswith(".md") and anchor not in headings_of(dest):
                fail(path, line, f"link to {target}: {os.path.relpath(dest, ROOT)} has no "
                     f"heading #{anchor}")


# ---- b. Tests cited in the docs --------------------------------------------

class Tests:
    def __init__(self, catch_names, ctest_names, suites, cli_check_names, sections):
        self.catch = {norm(n) for n in catch_names}
        self.families = {n.split(": ")[0] for n in self.catch if ": " in n}
        self.ctest = ctest_names
        self.suites = suites
        self.cli_checks = cli_check_names
        self.sections = sections

    def methods(self, module):
        mods = [module] if module else list(self.suites)
        return {m for mod in mods for c in self.suites.get(mod, {}).values() for m in c}

    def catch_ok(self, text):
        if text.endswith("..."):
            start = text[:-3].rstrip()
            return any(n.startswith(start) for n in self.catch)
        return text in self.catch


def paren_depth_before(text, pos):
    """Parentheses open at pos, counting only text outside code spans."""
    depth = 0
    outside = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), text[:pos])
    for ch in outside:
        depth += {"(": 1, ")": -1}.get(ch, 0)
    return max(depth, 0)


def closing_paren(text, start):
    """Index of the ')' that closes the '(' at start, skipping code spans."""
    depth, i = 0, start
    while i < len(text):
        if text[i] == "`":
            j = text.find("`", i + 1)
            i = j + 1 if j > 0 else len(text)
            continue
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
        i += 1
    return len(text)


def is_path_like(text):
    return "/" in text or text.endswith((".cc", ".h", ".py", ".sh", ".md"))


def check_test_citations(unit, tests):
    module = None
    test_column = unit.column in ("test", "tests")
    rules_page = os.path.relpath(unit.path, ROOT) == os.path.join("docs", "behaviour.md")
    for line, raw, start, end in unit.spans():
        s = norm(raw)
        known = True
        before = re.sub(r"`[^`]*`", "", unit.text[:start])
        if re.search(r"\bctest\)?\s*$", before):
            count("ctest names cited", unit.path, line, s)
            ok = (s in tests.ctest or tests.catch_ok(s) or (
                s.endswith("...") and any(n.startswith(s[:-3].rstrip()) for n in tests.ctest)))
            if not ok:
                fail(unit.path, line, f"`{s}`: no ctest of that name")
            if s in tests.suites:
                module = s
        elif m := re.fullmatch(r"e2e ([A-Za-z_]\w*)", s):
            count("e2e suites cited", unit.path, line, s)
            if m.group(1) not in tests.suites:
                fail(unit.path, line, f"`{s}`: no tests/e2e/{m.group(1)}.py")
            else:
                module = m.group(1)
        elif re.fullmatch(r"test_\w*(\.\.\.)?", s):
            count("e2e methods cited", unit.path, line, s)
            methods = tests.methods(module)
            ok = (any(x.startswith(s[:-3]) for x in methods) if s.endswith("...") else s in methods)
            if not ok:
                fail(unit.path, line, f"`{s}`: no such test method in "
                     + (f"tests/e2e/{module}.py" if module else "tests/e2e/*_test.py"))
        elif m := re.fullmatch(r"([a-z_]\w*_test)\.([A-Z]\w*)(?:\.(test_\w+))?", s):
            count("e2e classes cited", unit.path, line, s)
            classes = tests.suites.get(m.group(1))
            if classes is None or m.group(2) not in classes or (
                    m.group(3) and m.group(3) not in classes[m.group(2)]):
                fail(unit.path, line, f"`{s}`: no such e2e test")
        elif re.fullmatch(r"[A-Z]\w*Test", s):
            count("e2e classes cited", unit.path, line, s)
            if not any(s in classes for classes in tests.suites.values()):
                fail(unit.path, line, f"`{s}`: no such class in tests/e2e/*_test.py")
        elif re.fullmatch(r"\w+", s) and (s.endswith("_test") or s.startswith("e2e_") or (
                test_column and "_" in s and not paren_depth_before(unit.text, start)) or (
                rules_page and re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)+", s))):
            count("ctest names cited", unit.path, line, s)
            if s in tests.suites:
                module = s
            elif s not in tests.ctest:
                fail(unit.path, line, f"`{s}`: no ctest or e2e suite of that name")
        elif (": " in s and s.split(": ")[0] in tests.families
              and not SENTENCE_BREAK.search(s)):
            count("Catch2 tests cited", unit.path, line, s)
            if not tests.catch_ok(s):
                fail(unit.path, line, f"`{s}`: no Catch2 test case "
                     + ("begins so" if s.endswith("...") else "has that name"))
            if test_column:
                check_quoted_after(unit, end, tests.sections, "a SECTION of tests/*.cc", line)
        elif s in tests.catch:
            count("Catch2 tests cited", unit.path, line, s)
        else:
            known = False
        if not known and test_column and not paren_depth_before(unit.text, start) \
                and not is_path_like(s):
            count("Catch2 tests cited", unit.path, line, s)
            if not tests.catch_ok(s):
                fail(unit.path, line, f"`{s}` in a test column: no Catch2 test case, ctest or "
                     "e2e suite of that name")
        if s == "cli_test":
            check_quoted_after(unit, end, tests.cli_checks, "a check of tests/cli_test.sh", line,
                               colon=True)


def check_quoted_after(unit, end, names, what, line, colon=False):
    """Quoted names in the parentheses (or, with colon, after ': ') that
    follow a citation ending at end."""
    rest = unit.text[end:]
    m = re.match(r"\s*(\(|:\s*\")", rest)
    if not m or (m.group(1) != "(" and not colon):
        return
    if m.group(1) == "(":
        body = rest[m.start(1):closing_paren(rest, m.start(1))]
    else:
        body = rest[m.end(1) - 1:]
        body = body[:body.find('"', 1) + 1]
    for q in re.finditer(r'"([^"]+)"', body):
        count("sections and checks cited", unit.path, line, q.group(1))
        if norm(q.group(1)) not in names:
            fail(unit.path, line, f'"{norm(q.group(1))}": not {what}')


# ---- c. Paths ----------------------------------------------------------------

class Paths:
    def __init__(self):
        self.build_dirs = build_dirs()
        self.basenames = {os.path.basename(f) for f in repo_files()}

    def check(self, path, line, token):
        token = token.strip("\"'()[]{}<>,;:")
        token = token.rstrip(".") if not token.endswith("...") else token
        while token.startswith("./"):
            token = token[2:]
        if token.startswith("build/"):
            self.check_build(path, line, token)
        elif token.startswith(REPO_PREFIXES):
            count("paths", path, line, token)
            if "..." in token:
                where = token[:token.index("...")].rsplit("/", 1)[0]
                ok = os.path.isdir(os.path.join(ROOT, where))
            elif any(c in token for c in "*?["):
                ok = bool(glob.glob(os.path.join(ROOT, token)))
            else:
                ok = os.path.exists(os.path.join(ROOT, token))
            if not ok:
                fail(path, line, f"{token}: no such file in the repository")
        elif re.fullmatch(r"[\w@.-]+\.(cc|h|py|sh)", token):
            count("paths", path, line, token)
            if token not in self.basenames:
                fail(path, line, f"{token}: no file of that name in the repository")

    def check_build(self, path, line, token):
        count("build paths", path, line, token)
        parts = token.split("/")
        if len(parts) < 2 or not parts[1]:
            return
        if parts[1] not in self.build_dirs:
            fail(path, line, f"{token}: no script makes build/{parts[1]} (they make "
                 + ", ".join("build/" + d for d in sorted(self.build_dirs)) + ")")
            return
        if len(parts) == 4 and parts[3] and not any(c in parts[3] for c in "*?[") \
                and "..." not in parts[3]:
            outputs = cmake_outputs(parts[2])
            if outputs is not None and parts[3] not in outputs:
                fail(path, line, f"{token}: {parts[2]}/CMakeLists.txt builds no {parts[3]} (it "
                     f"builds {', '.join(sorted(outputs)) or 'nothing'})")


def words(text):
    """Shell-ish words; brackets are words of their own, quotes and parentheses go."""
    text = text.replace("\\|", "|")
    return re.findall(r"\[|\]|[^\s\[\]()\"',;]+", text)


# ---- d. Options ----------------------------------------------------------------

class Options:
    def __init__(self, cli_top, cli_subs, server, plugin):
        self.cli_top, self.cli_subs, self.server, self.plugin = cli_top, cli_subs, server, plugin
        self.cli_all = set(cli_top).union(*cli_subs.values()) if cli_subs else set(cli_top)

    def program_of(self, word, current):
        base = os.path.basename(word)
        if current and current[0] == "nbdkit" and (base in ("dmremap", "nbdkit-dmremap-plugin.so")
                                                  or base.endswith("dmremap.so")):
            return ("plugin", None)
        if base in OUR_PROGRAMS:
            return (OUR_PROGRAMS[base], None)
        return (base, None)

    def check_command(self, path, line, text, default=None):
        """Options of one command line or span; default is the program of a
        span that starts with an option."""
        tokens = words(text)
        prog, expect = default, True
        stack = []
        for i, tok in enumerate(tokens):
            if tok.startswith("#"):
                break
            if tok == "[":
                nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
                if os.path.basename(nxt) in OUR_PROGRAMS or nxt in FOREIGN_PROGRAMS:
                    stack.append(prog)
                    expect = True
                else:
                    stack.append(None)
                continue
            if tok == "]":
                if stack:
                    saved = stack.pop()
                    prog = saved if saved is not None else prog
                continue
            if tok in ("|", "||", "&&", "$("):
                expect = True
                continue
            if expect:
                if tok.startswith("-"):
                    expect = False
                elif tok == "$" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tok):
                    continue
                else:
                    if prog and prog[0] == "cli" and tok in self.cli_subs:
                        prog = ("cli", tok)
                    else:
                        prog = self.program_of(tok, prog)
                    expect = False
                    continue
            base = os.path.basename(tok)
            installed = "/" in tok and re.search(r"/(bin|tools|server)/[^/]*$", tok)
            if tok in FOREIGN_PROGRAMS or tok in OUR_PROGRAMS or (
                    installed and base in OUR_PROGRAMS):
                prog = self.program_of(tok, prog)
                continue
            if base.endswith("dmremap.so") and prog and prog[0] == "nbdkit":
                prog = ("plugin", None)
                continue
            if prog is None:
                continue
            if prog[0] == "cli" and prog[1] is None and tok in self.cli_subs:
                prog = ("cli", tok)
                continue
            opt = re.match(r"^--([a-z][a-z0-9-]*)", tok)
            if prog[0] == "cli" and opt:
                sub = self.cli_subs.get(prog[1], set()) if prog[1] else self.cli_all
                allowed = self.cli_top | sub
                count("dmremap options", path, line, f"{prog} {tok}")
                if "--" + opt.group(1) not in allowed:
                    where = f"dmremap {prog[1]}" if prog[1] else "dmremap"
                    fail(path, line, f"--{opt.group(1)}: `{where} --help` has no such option")
            elif prog[0] == "server" and opt:
                count("dmremap-server options", path, line, tok)
                if "--" + opt.group(1) not in self.server:
                    fail(path, line,
                         f"--{opt.group(1)}: `dmremap-server --help` has no such option")
            elif prog[0] == "plugin" and (key := re.match(r"^([a-z][a-z0-9-]*)=", tok)):
                count("plugin keys", path, line, tok)
                if key.group(1) not in self.plugin:
                    fail(path, line, f"{key.group(1)}=: the plugin's --help has no such key")

    def check_key(self, path, line, text):
        key = re.match(r"^([a-z][a-z0-9-]*)=", text)
        if key:
            count("plugin keys", path, line, text)
            if key.group(1) not in self.plugin:
                fail(path, line, f"{key.group(1)}=: the plugin's --help has no such key")


def section_subcommand(section, subs):
    m = re.match(r"^##+ `dmremap ([a-z-]+)", section)
    return m.group(1) if m and m.group(1) in subs else None


def check_options(path, units, fences, options):
    name = os.path.relpath(path, ROOT)
    for unit in units:
        default = None
        if name == "docs/cli.md":
            default = ("cli", section_subcommand(unit.section, options.cli_subs))
        elif name == "docs/server.md":
            default = ("server", None)
        for line, raw, _, _ in unit.spans():
            text = norm(raw)
            first = text.split(" ")[0] if text else ""
            if name == "docs/cli.md" and first in options.cli_subs:
                options.check_command(path, line, text, ("cli", None))
            else:
                options.check_command(path, line, text, default if first.startswith("-") else None)
            in_params = name == "docs/plugin.md" and unit.section.startswith("## Parameters") \
                and unit.text.startswith("`")
            in_readme = name == "README.md" and unit.text.startswith("Plugin parameters:")
            if in_params and unit.text.split("\n")[0].find(f"`{raw}`") >= 0:
                options.check_key(path, line, text)
            elif in_readme:
                options.check_key(path, line, text)
    for line, text, lang, _ in fences:
        if lang in ("", "sh", "shell", "console"):
            options.check_command(path, line, re.sub(r"^\$ ", "", text.strip()))
        elif lang == "python":
            options.check_command(path, line, text)


# ---- Main ------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cli", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--plugin", required=True)
    p.add_argument("--catch", required=True, help="the Catch2 binary, dmremap_tests")
    p.add_argument("--build-dir", required=True, help="the build tree whose ctest names count")
    p.add_argument("-v", "--verbose", action="store_true", help="print every citation checked")
    args = p.parse_args()
    global VERBOSE
    VERBOSE = args.verbose

    catch_names = [l.strip() for l in run([args.catch, "--list-test-names-only"]).splitlines()
                   if l.strip()]
    ctest_names = ctest_list(args.build_dir)
    tests = Tests(catch_names, ctest_names, e2e_suites(), cli_checks(), catch_sections())
    cli_top, cli_subs = cli_options(args.cli)
    options = Options(cli_top, cli_subs, server_options(args.server), plugin_keys(args.plugin))
    for what, found in (("Catch2 test names", tests.catch), ("ctest names", ctest_names),
                        ("dmremap subcommands", cli_subs),
                        ("dmremap-server options", options.server),
                        ("plugin keys", options.plugin)):
        if not found:
            fail(__file__, 1, f"found no {what}: is the binary or build directory right?")

    check_cited_documents()
    paths = Paths()
    headings = {}

    def headings_of(md):
        if md not in headings:
            headings[md] = read_markdown(md)[2]
        return headings[md]

    for path in doc_files():
        units, fences, _ = read_markdown(path)
        check_links(path, units, headings_of)
        for unit in units:
            check_test_citations(unit, tests)
            for line, raw, _, _ in unit.spans():
                for token in norm(raw).split(" "):
                    paths.check(path, line, token)
        for line, text, _, _ in fences:
            for token in text.split():
                if token.startswith("#"):
                    break
                paths.check(path, line, token)
        check_options(path, units, fences, options)

    # A rule that stops matching anything is a broken rule, not a clean tree.
    for what in ("documents cited", "links", "e2e suites cited", "e2e methods cited",
                 "ctest names cited", "Catch2 tests cited", "sections and checks cited", "paths",
                 "build paths", "dmremap options", "dmremap-server options", "plugin keys"):
        if not counts.get(what):
            fail(__file__, 1, f"no {what} were found in the docs: a rule of this test is broken")
    for f in failures:
        print(f)
    print("docs_test: checked " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
    print(f"docs_test: {len(failures)} problem(s)" if failures
          else "docs_test: the docs match the code")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
