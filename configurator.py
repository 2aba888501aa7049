"""
The one configurator every µLM script uses.

    python train.py config/shakespeare_char.py --batch_size=32 --compile=False

Defaults live in the script as a dict; config files (plain `key = value` Python) override them in
order, then `--key=value` arguments. Values parse with ast.literal_eval, or stay strings. Unknown
keys, wrong types and broken config files stop the script with a message that says what to fix.
"""
import ast
import difflib
import json
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


def set_key(config, key, value, source):
    if key not in config:
        close = difflib.get_close_matches(key, config.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
    default = config[key]
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


def configure(defaults, argv):
    """Resolve defaults <- config files <- --key=value arguments into a new dict."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"argument '{arg}' must look like --{key}=value")
            set_key(config, key.replace("-", "_"), parse_value(text), f"argument {arg}")
        else:
            for key, value in read_config_file(arg).items():
                set_key(config, key, value, f"config file {arg}")
    return config


def print_config(config):
    print("config:", json.dumps(config, default=str))
