"""``photocal store``: look after a store at any URL (local path or s3://)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path


def _time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"time {text!r} is not ISO 8601 (e.g. 2026-12-01T06:00, UTC unless an offset is given)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def add_store_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="list, copy, roll back and clean a store (any URL)")
    cmds = p.add_subparsers(dest="store_command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        type=Path,
        help="TOML configuration whose [store] table says how to reach object stores "
        "(endpoint_url, region, key_env, secret_env, storage_options)",
    )

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return cmds.add_parser(name, help=text, parents=[config])

    q = add("ls", "groups with their state (complete or not) and version")
    q.add_argument("store", help="store path or URL (s3://bucket/prefix)")
    q.add_argument("prefix", nargs="?", default="", help="only groups under this one")

    q = add("log", "the versions of one group (object stores)")
    q.add_argument("store")
    q.add_argument("group")

    q = add("copy", "copy complete groups between two store URLs")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument(
        "--group",
        dest="groups",
        action="append",
        help="a group to copy (repeatable; default: every complete group)",
    )

    q = add("gc", "remove staging left by killed writers (old enough and not locked)")
    q.add_argument("store")
    q.add_argument(
        "--min-age",
        default="12h",
        help="leave staging written more recently than this (s/m/h/d; default 12h)",
    )
    q.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")

    q = add("rollback", "make earlier versions current again, e.g. undo a backfill (object stores)")
    q.add_argument("store")
    q.add_argument(
        "--as-of",
        type=_time,
        required=True,
        help="every group changed after this time goes back to its version then",
    )
    q.add_argument("--group", dest="groups", action="append", help="only these groups")


def cmd_store(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError

    from tasks.config import ConfigError, load_config
    from tasks.io import store_tools as tools
    from tasks.io.objstore import use_store_config
    from tasks.io.store import StoreError, group_history

    try:
        if args.config is not None:
            use_store_config(load_config(args.config)["store"])
        if args.store_command == "ls":
            groups = tools.list_store(args.store, args.prefix)
            for g in groups:
                version = "" if g.version is None else f"  version {g.version} of {g.versions}"
                written = "" if g.written is None else f"  {g.written}"
                print(f"{g.name}  {g.state}{version}{written}")
            print(f"{len(groups)} group(s)", file=sys.stderr)
        elif args.store_command == "log":
            for v in group_history(args.store, args.group):
                print(f"version {v.version}  {v.time}  {v.note}  {v.build or 'absent'}")
        elif args.store_command == "copy":
            copied = tools.copy_store(args.src, args.dst, args.groups)
            for name in copied:
                print(f"copied {name}")
            print(f"{len(copied)} group(s) copied to {args.dst}")
        elif args.store_command == "gc":
            lines = tools.collect_garbage(
                args.store, min_age_s=tools.parse_duration(args.min_age), dry_run=args.dry_run
            )
            verb = "would remove" if args.dry_run else "removed"
            for line in lines:
                print(f"{verb} {line}")
            print(f"{verb} {len(lines)} item(s)")
        elif args.store_command == "rollback":
            lines = tools.roll_back(args.store, args.as_of, args.groups)
            for line in lines:
                print(line)
            print(f"{len(lines)} group(s) rolled back to {args.as_of.isoformat()}")
    except ConfigError as err:
        print(f"photocal store {args.store_command}: {err}", file=sys.stderr)
        return 2
    except (StoreError, ValueError) as err:
        print(f"photocal store {args.store_command}: {err}", file=sys.stderr)
        return 1
    except (BotoCoreError, OSError) as err:  # an object store not reachable
        print(
            f"photocal store {args.store_command}: cannot reach the store: {err} (endpoint and "
            "credentials: the AWS_* variables, or the [store] table of --config)",
            file=sys.stderr,
        )
        return 1
    return 0
