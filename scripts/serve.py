#!/usr/bin/env python
"""Run `serve run CONFIG`, optionally overriding settings first.

    python scripts/serve.py serve_config.yaml --set checkpoint_file=/models/frcnn.pth --set score_threshold=0.3

Each KEY goes where it is owned (mmdet_ls/settings.py): live settings
(score_threshold, max_batch_size, batch_wait_timeout_s) into their
deployment's user_config, everything else into the application's args.
Overrides go into a copy of the config (the original stays untouched); then
this process becomes `serve run` on it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a script: the project root is not on sys.path
from mmdet_ls.settings import LIVE_SETTINGS  # noqa: E402


def parse_value(raw: str):
    return yaml.safe_load(raw) if raw else raw


def apply_overrides(config: dict, overrides: list[str], port: int | None) -> dict:
    app = config["applications"][0]
    args = app.get("args") or {}
    deployments = app.setdefault("deployments", [])
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        if key in LIVE_SETTINGS:
            owner = next((d for d in deployments if d.get("name") == LIVE_SETTINGS[key]), None)
            if owner is None:
                owner = {"name": LIVE_SETTINGS[key]}
                deployments.append(owner)
            owner.setdefault("user_config", {})[key] = parse_value(value.strip())
        else:
            args[key] = parse_value(value.strip())
    app["args"] = args
    if port:
        config.setdefault("http_options", {})["port"] = port
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="serve_config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an app arg")
    parser.add_argument("--port", type=int, help="override http_options.port")
    opts, rest = parser.parse_known_args()
    config_path = opts.config
    if opts.set or opts.port:
        with open(config_path) as f:
            config = apply_overrides(yaml.safe_load(f), opts.set, opts.port)
        fd, config_path = tempfile.mkstemp(prefix="serve_config.", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        print(f"serve run {config_path} (from {opts.config} with {' '.join(opts.set)})", flush=True)
    serve_bin = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    os.execv(serve_bin, [serve_bin, "run", config_path, *rest])


if __name__ == "__main__":
    main()
