"""``durable-mp callback ID --success/--failure/--heartbeat``: complete a waiting callback."""

from __future__ import annotations

import argparse
import sys

from durable_mp.lambda_service import ErrorObject
from durable_mp.store.callbacks import send_callback_failure, send_callback_heartbeat, send_callback_success


def add_parser(sub: argparse._SubParsersAction, store_opt: argparse.ArgumentParser) -> None:
    p = sub.add_parser("callback", parents=[store_opt], help="complete a callback an execution is waiting for",
                       description="Complete the callback ID (from create_callback / wait_for_callback) so the "
                                   "waiting execution continues.")
    p.add_argument("callback_id", metavar="ID")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--success", metavar="RESULT", nargs="?", const="",
                      help="succeed with RESULT (text, e.g. JSON); without RESULT the callback's result is None")
    what.add_argument("--failure", metavar="MESSAGE", help="fail with MESSAGE (CallbackExternalError)")
    what.add_argument("--heartbeat", action="store_true", help="keep a callback with a heartbeat timeout alive")
    p.add_argument("--error-type", default="CallbackExternalError", help="error type reported with --failure")
    p.set_defaults(func=cmd_callback)


def cmd_callback(args: argparse.Namespace) -> int:
    store = getattr(args, "store", None)
    if args.heartbeat:
        send_callback_heartbeat(args.callback_id, store=store)
        print("heartbeat recorded", file=sys.stderr)
    elif args.failure is not None:
        send_callback_failure(args.callback_id, ErrorObject(args.failure, args.error_type, None, None), store=store)
        print("callback failed", file=sys.stderr)
    else:
        send_callback_success(args.callback_id, args.success, store=store)
        print("callback succeeded", file=sys.stderr)
    return 0
