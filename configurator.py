"""
The one configurator every µLM script uses.

    python train.py config/shakespeare_char.py --batch_size=32 --compile=False

Defaults live in the script as a dict; config files (plain `key = value` Python) override them in
order, then `--key=value` arguments. Values parse with ast.literal_eval, or stay strings. Unknown
keys, wrong types and broken config files stop the script with a message that says what to fix.
`--help` (or `-h`) prints every key with its default and the comment beside it in the script's source.
"""
import ast
import difflib
import io
import json
import os
import shutil
import sys
import textwrap
import tokenize
import traceback


class ConfigError(SystemExit):
    """A configuration mistake: exits with its message (and is catchable in tests)."""


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cuda is a string


def type_ok(default, value):
    if default is None:
        return True  # None defaults accept anything (e.g. an optional seed)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def set_key(config, key, value, source, optional=()):
    if key not in config:
        close = difflib.get_close_matches(key, config.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
    default = config[key]
    if value is None and key in optional:
        config[key] = None
        return
    if not type_ok(default, value):
        raise ConfigError(f"{source}: '{key}' expects {type(default).__name__} "
                          f"(default {default!r}), got {type(value).__name__} {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if isinstance(default, tuple):
        value = tuple(value)
    config[key] = value


def read_config_file(path):
    """The `key = value` assignments of a config file; errors name the file and line."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error in config file: {e.msg}")
    except Exception as e:
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__))
                     if fr.filename == path), "?")
        raise ConfigError(f"{path}:{line}: config file failed: {type(e).__name__}: {e}")
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def line_comment(line):
    """The `# comment` on one source line, or ''."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, SyntaxError):
        tokens = []
    return next((t.string.lstrip("# ").strip() for t in tokens if t.type == tokenize.COMMENT), "")


def key_docs(path):
    """({key: comment}, {key: heading}) of a source file's dict(...) calls and annotated class fields. The comment
    on a key's line documents it, carried on by comment lines indented past the key; a comment line at the
    key's own indent is a section heading, kept under the key before it ("" for the first)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    comments, headings = {}, {}
    nodes = list(ast.walk(ast.parse(source)))
    groups = [[(k.arg, k.lineno, k.col_offset) for k in node.keywords] for node in nodes  # dict(...) calls first:
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"]  # a script's DEFAULTS
    groups += [[(n.target.id, n.lineno, n.col_offset) for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
               for node in nodes if isinstance(node, ast.ClassDef)]
    for keys in groups:
        previous = ""
        for key, lineno, col in keys:
            above = lineno - 2  # the heading lines right above this key, between it and the previous one
            while above >= 0 and lines[above].strip().startswith("#") and indent(lines[above]) == col:
                above -= 1
            heading = " ".join(line_comment(line) for line in lines[above + 1:lineno - 1])
            if heading and previous not in headings:
                headings[previous] = heading
            if key is None:  # **{...}: its keys follow the previous one
                continue
            comment, below = line_comment(lines[lineno - 1]), lineno
            while comment and below < len(lines) and lines[below].strip().startswith("#") and indent(lines[below]) > col:
                comment += " " + line_comment(lines[below])  # a comment carried on below its key
                below += 1
            if comment and key not in comments:
                comments[key] = comment
            previous = key
    return comments, headings


def indent(line):
    return len(line) - len(line.lstrip())


def print_help(defaults, script_globals, usage=None):
    """The script's docstring, then every key = default with its comment, under the section headings of the
    script's DEFAULTS. Comments come from the script's source first, then from the modules beside it that it
    imported (train.py's model keys: architecture.py's option classes)."""
    script = os.path.abspath(script_globals["__file__"])
    folder = os.path.dirname(script)
    beside = {os.path.abspath(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    sources = [script] + sorted(p for p in beside if os.path.dirname(p) == folder and p.endswith(".py")
                                and os.path.isfile(p) and p != script)
    comments, headings = {}, {}
    for path in sources:
        more_comments, more_headings = key_docs(path)
        if path != script:
            more_headings.pop("", None)  # a module's first heading is not the script's
        comments, headings = more_comments | comments, more_headings | headings
    doc = (script_globals.get("__doc__") or "").strip()
    print(f"{doc}\n\n" if doc else "", end="")
    print(f"usage: {usage or f'python {os.path.relpath(script)} [config.py ...] [--key=value ...]'}\n"
          f"(a value is a Python literal or a bare word; later ones override earlier ones)\n\nkeys and defaults:")
    width = min(40, max(len(f"{k}={v!r}") for k, v in defaults.items()))
    columns = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    previous = ""
    for key, value in defaults.items():
        if headings.get(previous):
            print(f"\n  {headings[previous]}")
        previous = key
        setting = f"--{key}={value!r}"
        if len(setting) > width + 2:  # a long default gets its own line, the comment below it
            print(f"  {setting}")
            setting = ""
        text = textwrap.wrap(comments.get(key, ""), columns - width - 6, break_on_hyphens=False,
                             break_long_words=False) or [""]
        print(f"  {setting:<{width + 2}}  {text[0]}".rstrip())
        for more in text[1:]:
            print(f"  {'':<{width + 2}}  {more}")


def configure(defaults, argv, optional=(), usage=None):
    """Resolve defaults <- config files <- --key=value arguments into a new dict.

    Keys named in `optional` also accept None (e.g. sample.py's top_k=None: no top-k cut).
    --help or -h prints the keys of the calling script (under `usage`, if given) and exits; --show_config prints
    the resolved config as one line of JSON and exits (how one script reads another's settings without importing it)."""
    if "--help" in argv or "-h" in argv:
        print_help(defaults, sys._getframe(1).f_globals, usage)
        raise SystemExit(0)
    show = "--show_config" in argv
    config = dict(defaults)
    for arg in (a for a in argv if a != "--show_config"):
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"argument '{arg}' must look like --{key}=value")
            set_key(config, key.replace("-", "_"), parse_value(text), f"argument {arg}", optional)
        else:
            for key, value in read_config_file(arg).items():
                set_key(config, key, value, f"config file {arg}", optional)
    if show:
        print(json.dumps(config, default=str))
        raise SystemExit(0)
    return config


def settings(argv):
    """What a list of config files and --key=value arguments sets, unchecked and without defaults: what a
    script reads of the command line it will give another script."""
    config = {}
    for arg in argv:
        if arg.startswith("--"):
            key, _, text = arg[2:].partition("=")
            config[key.replace("-", "_")] = parse_value(text)
        else:
            config.update(read_config_file(arg))
    return config


def print_config(config):
    print("config:", json.dumps(config, default=str))


def check_ranges(config, at_least_one=(), not_negative=(), fractions=()):
    """The range checks every script makes up front: a value out of range stops with its key named."""
    for key in at_least_one:
        if config[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {config[key]}")
    for key in not_negative:
        if config[key] < 0:
            raise ConfigError(f"{key} must not be negative, got {config[key]}")
    for key in fractions:
        if not 0 <= config[key] <= 1:
            raise ConfigError(f"{key} must be between 0 and 1, got {config[key]}")
