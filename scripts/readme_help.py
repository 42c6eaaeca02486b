"""Rewrite the README's flag reference from `--help`, so the two never disagree (tests/test_docs.py checks)."""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- help:begin -->", "<!-- help:end -->"
WIDTH = "100"  # columns the help text is wrapped at


def current_help() -> str:
    os.environ["COLUMNS"] = WIDTH
    sys.path.insert(0, ROOT)
    import s2s_server_pipeline
    return s2s_server_pipeline.build_parser().format_help()


def help_block() -> str:
    return f"{BEGIN}\n```text\n{current_help()}```\n{END}"


if __name__ == "__main__":
    path = os.path.join(ROOT, "README.md")
    text = open(path, encoding="utf-8").read()
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: help_block(), text, flags=re.S)
    open(path, "w", encoding="utf-8").write(text)
