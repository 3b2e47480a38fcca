#!/usr/bin/python3
"""The man pages in man/ render cleanly and keep up with the programs.
Standard library only.

  tests/man_test.py --cli DMREMAP --server DMREMAP_SERVER --plugin DMREMAP_SO

ctest runs it as `man_test` with the built binaries. For each page:
- groff renders it (-man -Tutf8 -ww) with no warning and no error;
- man-db's lexgrog reads its NAME line, as mandb does for whatis and apropos;
- it has the sections every page has (NAME, SYNOPSIS, DESCRIPTION, OPTIONS or
  PARAMETERS, SEE ALSO; EXIT STATUS for the two commands);
- its rendered text names every option its program's --help lists:
  dmremap.8 every command of `dmremap --help` (each with a .SS section of
  its own) and every option of it and of each `dmremap COMMAND --help`; dmremap-server.8 every option of
  `dmremap-server --help`; nbdkit-dmremap-plugin.1 every key= of
  `nbdkit dmremap.so --help`.
groff and lexgrog come with the test profile (scripts/setup-deps test): if
either is missing the test fails, it does not skip. One line per check, "ok"
or "FAIL"; the exit status is 1 if any check failed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "man")

passed = 0
failed = 0


def ok(what):
    global passed
    passed += 1
    print(f"ok - {what}")


def flunk(what):
    global failed
    failed += 1
    print(f"FAIL - {what}")


def run(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, **kw)


def help_text(argv):
    r = run(argv)
    return r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")


def help_options(text):
    """Every option of a CLI11 --help: the lines "  -x,--long ..."."""
    found = []
    for line in text.splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            found += [o for o in m.group(1).split(",") if o.startswith("-")]
    return found


def cli_words(cli):
    """The commands of `dmremap --help`, and the options of it and of each
    command's --help."""
    top = help_text([cli, "--help"])
    words, commands, in_commands = help_options(top), [], False
    for line in top.splitlines():
        if line.startswith("Subcommands:"):
            in_commands = True
        elif in_commands and re.match(r"^  [a-z]", line):
            commands.append(line.split()[0])
        elif in_commands and line and not line.startswith(" "):
            in_commands = False
    for c in commands:
        words += help_options(help_text([cli, c, "--help"]))
    return commands + words, len(commands)


def plugin_keys(plugin):
    return [m.group(1) + "=" for line in help_text(["nbdkit", plugin, "--help"]).splitlines()
            if (m := re.match(r"^([a-z][a-z0-9-]*)=", line))]


def render(page):
    """The page as text on one long line per paragraph, so that no option is
    broken across lines; bold and underline taken out."""
    r = run(["groff", "-man", "-Tutf8", "-rLL=2000n", page])
    text = r.stdout.decode("utf-8", "replace")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    # A hyphen or minus sign groff may print for "-" or "\-".
    return re.sub(r".\x08", "", text).replace("\u2010", "-").replace("\u2212", "-")


def check_page(name, words, noun, sections, subsections=()):
    page = os.path.join(MAN, name)
    if not os.path.isfile(page):
        flunk(f"{name}: no such page in man/")
        return
    r = run(["groff", "-man", "-Tutf8", "-ww", "-z", page])
    warnings = (r.stdout + r.stderr).decode("utf-8", "replace").strip()
    if r.returncode == 0 and not warnings:
        ok(f"{name}: groff renders it without warnings")
    else:
        flunk(f"{name}: groff -man -Tutf8 -ww (exit {r.returncode}):\n{warnings}")

    r = run(["lexgrog", page])
    out = r.stdout.decode("utf-8", "replace").strip()
    stem = name.rsplit(".", 1)[0]
    if r.returncode == 0 and f'"{stem} - ' in out:
        ok(f"{name}: lexgrog reads its NAME line")
    else:
        flunk(f"{name}: lexgrog (exit {r.returncode}) does not read \"{stem} - ...\": {out}")

    source = open(page, encoding="utf-8").read()
    heads = {h.strip('"') for h in re.findall(r"^\.SH\s+(.+?)\s*$", source, re.M)}
    missing = [s for s in sections if not any(h in heads for h in s.split("|"))]
    if missing:
        flunk(f"{name}: no section {', '.join(missing)}")
    else:
        ok(f"{name}: has {', '.join(sections)}")
    subs = {h.strip('"').replace("\\-", "-").split()[0]
            for h in re.findall(r"^\.SS\s+(.+?)\s*$", source, re.M)}
    missing = [s for s in subsections if s not in subs]
    if missing:
        flunk(f"{name}: no .SS section for {', '.join(missing)}")
    elif subsections:
        ok(f"{name}: has a .SS section for each of {', '.join(subsections)}")

    text = render(page)
    absent = [w for w in dict.fromkeys(words)
              if not re.search(r"(?<![\w-])" + re.escape(w) + (r"(?![\w-])" if not w.endswith("=")
                                                               else ""), text)]
    if absent:
        flunk(f"{name}: does not name {', '.join(absent)}, which --help lists")
    else:
        ok(f"{name}: names all {len(set(words))} {noun} --help lists")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cli", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--plugin", required=True)
    args = p.parse_args()

    for tool, package in (("groff", "groff-base"), ("lexgrog", "man-db")):
        if not shutil.which(tool):
            print(f"FAIL - {tool} is missing: install {package} (scripts/setup-deps test)")
            return 1

    common = ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"]
    cli, commands = cli_words(args.cli)
    command_names = cli[:commands]
    server = help_options(help_text([args.server, "--help"]))
    plugin = plugin_keys(args.plugin)
    # A --help that no longer parses must not pass as "nothing to check".
    for what, n in (("dmremap commands", commands), ("dmremap options", len(set(cli[commands:]))),
                    ("dmremap-server options", len(server)), ("plugin keys", len(plugin))):
        if n:
            ok(f"found {n} {what} in --help")
        else:
            flunk(f"found no {what} in --help: is the binary right?")

    check_page("dmremap.8", cli, "commands and options", common + ["OPTIONS", "EXIT STATUS"],
               command_names)
    check_page("dmremap-server.8", server, "options",
               common + ["OPTIONS", "EXIT STATUS", "ENVIRONMENT"])
    check_page("nbdkit-dmremap-plugin.1", plugin, "keys", common + ["PARAMETERS|OPTIONS"])

    print(f"man_test: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
