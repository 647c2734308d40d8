"""The log of an experiment's invocations (`invocations.jsonl` in its workdir): each command run, with
what it computed, so a page can list the commands that produced its numbers."""
import json
import os

from growjax.outputs import read_jsonl

FILE = 'invocations.jsonl'


def record(workdir: str, entry: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, FILE), 'a') as f:
        f.write(json.dumps(entry) + '\n')


def read(workdir: str) -> list[dict]:
    return read_jsonl(os.path.join(workdir, FILE))
