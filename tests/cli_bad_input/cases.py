"""The bad-input table: (command line, files it needs, words the one-line message must contain).

Placeholders in a command line: ``{d}`` is the case's own folder (also the working directory), where
``good.jsonl`` (a valid 24-user file) and the case's files are written first. ``{sys}`` is a location no
one can write to (``/sys``), even as root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli_bad_input.userdata import Mutation, edit, json_with, raw_line


@dataclass(frozen=True)
class Case:
    """One bad input: its id, the command line, the files it needs and what the message must name."""

    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    bad: Mutation | None = None  # written as {d}/bad.jsonl from the good records
    files: dict[str, Any] = field(default_factory=dict)  # extra files: name -> text, bytes, dict (JSON) or None (folder)
    name: str = "bad.jsonl"  # the bad file's name
    setup: Callable[[Path], None] | None = None  # more preparation in the case's folder (after the files)


def _c(id: str, argv: str, expect: str | tuple[str, ...], **kw: Any) -> Case:
    return Case(id, tuple(argv.split()), (expect,) if isinstance(expect, str) else expect, **kw)


def _set(path: str, value: Any, index: int = 2) -> Mutation:
    """Set a dotted path (list indices as numbers) in record ``index``."""
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]

    def fn(records: list[dict[str, Any]]) -> None:
        node: Any = records[index]
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value

    return edit(fn)


def _drop(path: str, index: int = 2) -> Mutation:
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]

    def fn(records: list[dict[str, Any]]) -> None:
        node: Any = records[index]
        for p in parts[:-1]:
            node = node[p]
        del node[parts[-1]]

    return edit(fn)


def _literal(key: str, literal: str) -> Mutation:
    """Record 3's first ``key`` value replaced by a JSON literal that json.dumps cannot write (NaN, 1e400)."""
    return json_with(2, lambda text: re.sub(rf'"{key}": [^,}}]+', f'"{key}": {literal}', text, count=1))


def _rename_key(path: str, old: str, new: str, index: int = 2) -> Mutation:
    parts = [int(p) if p.isdigit() else p for p in path.split(".")] if path else []

    def fn(records: list[dict[str, Any]]) -> None:
        node: Any = records[index]
        for p in parts:
            node = node[p]
        node[new] = node.pop(old)

    return edit(fn)


def _all(fn_each: Any) -> Mutation:
    def fn(records: list[dict[str, Any]]) -> None:
        for r in records:
            fn_each(r)

    return edit(fn)


def _folder(table: str, column: str, value: Any, row: int = 2) -> Callable[[Path], None]:
    """Save good.jsonl as a data set folder {d}/ds, then set one cell of one of its Parquet tables."""

    def setup(folder: Path) -> None:
        import pandas as pd

        from pluribus.data.store import load_jsonl, save_dataset

        save_dataset(load_jsonl(folder / "good.jsonl"), folder / "ds")
        path = folder / "ds" / table
        frame = pd.read_parquet(path)
        frame[column] = frame[column].astype(str if isinstance(value, str) else float)  # a column of one type
        frame.iloc[row, frame.columns.get_loc(column)] = value
        frame.to_parquet(path)

    return setup


V = "data validate {d}/bad.jsonl"
AT3 = "bad.jsonl:3"
TS = "sources.payments[0].timestamp"
AMOUNT = "sources.payments[0].amount"

# ---- the data layer, through `pluribus data validate` ------------------------------------------------
LOADER = [
    _c("ts-nan", V, (AT3, TS), bad=_literal("timestamp", "NaN")),
    _c("ts-inf", V, (AT3, TS), bad=_literal("timestamp", "Infinity")),
    _c("ts-neg-inf", V, (AT3, TS), bad=_literal("timestamp", "-Infinity")),
    _c("ts-huge", V, (AT3, TS), bad=_literal("timestamp", "1e300")),
    _c("ts-huge-int", V, (AT3, TS), bad=_literal("timestamp", "99999999999999999999999")),
    _c("ts-tomorrow", V, (AT3, TS, "'tomorrow'"), bad=_set("sources.payments.0.timestamp", "tomorrow")),
    _c("ts-now", V, (AT3, TS, "'now'"), bad=_set("sources.payments.0.timestamp", "now")),
    _c("ts-today", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", "today")),
    _c("ts-yesterday", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", "yesterday")),
    _c("ts-word", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", "last tuesday")),
    _c("ts-empty", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", "")),
    _c("ts-bool", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", True)),
    _c("ts-null", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", None)),
    _c("ts-list", V, (AT3, TS), bad=_set("sources.payments.0.timestamp", [1])),
    _c("ts-missing", V, (AT3, TS), bad=_drop("sources.payments.0.timestamp")),
    _c("num-nan", V, (AT3, AMOUNT, "finite"), bad=_literal("amount", "NaN")),
    _c("num-inf", V, (AT3, AMOUNT, "finite"), bad=_literal("amount", "Infinity")),
    _c("num-neg-inf", V, (AT3, AMOUNT), bad=_literal("amount", "-Infinity")),
    _c("num-overflow", V, (AT3, AMOUNT), bad=_literal("amount", "1e400")),
    _c("num-string", V, (AT3, AMOUNT, "number"), bad=_set("sources.payments.0.amount", "12")),
    _c("num-object", V, (AT3, AMOUNT), bad=_set("sources.payments.0.amount", {"x": 1})),
    _c("text-number", V, (AT3, "sources.payments[0].text", "string"), bad=_set("sources.payments.0.text", 5)),
    _c("profile-nan", V, (AT3, "profile.age"), bad=_literal("age", "NaN")),
    _c("profile-inf", V, (AT3, "profile.age"), bad=_literal("age", "Infinity")),
    _c("profile-text", V, (AT3, "profile.age"), bad=_set("profile.age", "old")),
    _c("profile-missing-key", V, (AT3, "profile.age"), bad=_drop("profile.age")),
    _c("profile-extra-key", V, (AT3, "profile.height"), bad=_set("profile.height", 180)),
    _c("profile-not-object", V, (AT3, "profile"), bad=_set("profile", [1, 2])),
    _c("profile-empty-key", V, (AT3, "profile"), bad=_rename_key("profile", "age", "")),
    _c("label-nan", V, (AT3, "labels.churn"), bad=_literal("churn", "NaN")),
    _c("label-inf", V, (AT3, "labels.churn"), bad=_literal("churn", "Infinity")),
    _c("label-bool", V, (AT3, "labels.churn"), bad=_set("labels.churn", True)),
    _c("label-list", V, (AT3, "labels.churn"), bad=_set("labels.churn", [1])),
    _c("label-mixed-types", V, (AT3, "labels.plan"), bad=_set("labels.plan", 3)),
    _c("label-empty-task", V, (AT3, "labels"), bad=_rename_key("labels", "churn", "")),
    _c("label-one-class", V, ("bad.jsonl", "labels.churn", "one class"),
       bad=_all(lambda r: r["labels"].update(churn=0))),
    _c("labels-not-object", V, (AT3, "labels"), bad=_set("labels", "churn")),
    _c("id-empty", V, (AT3, "user_id"), bad=_set("user_id", "")),
    _c("id-blank", V, (AT3, "user_id"), bad=_set("user_id", "   ")),
    _c("id-control-char", V, (AT3, "user_id"), bad=_set("user_id", "u\n02")),
    _c("id-null", V, (AT3, "user_id"), bad=_set("user_id", None)),
    _c("id-missing", V, (AT3, "user_id"), bad=_drop("user_id")),
    _c("id-float", V, (AT3, "user_id"), bad=_set("user_id", 1.5)),
    _c("id-bool", V, (AT3, "user_id"), bad=_set("user_id", True)),
    _c("id-list", V, (AT3, "user_id"), bad=_set("user_id", ["u"])),
    _c("id-duplicate", V, (AT3, "user_id", "duplicate", "'u00'"), bad=_set("user_id", "u00")),
    _c("id-duplicate-int-str", V, (AT3, "duplicate"),
       bad=edit(lambda rs: (rs[0].update(user_id=7), rs[2].update(user_id="7")))),
    _c("source-empty-name", V, (AT3, "sources"), bad=_rename_key("sources", "apps", "")),
    _c("source-blank-name", V, (AT3, "sources"), bad=_rename_key("sources", "apps", "  ")),
    _c("field-empty-name", V, (AT3, "sources.payments[0]"), bad=_rename_key("sources.payments.0", "amount", "")),
    _c("sources-not-object", V, (AT3, "sources"), bad=_set("sources", [])),
    _c("events-not-list", V, (AT3, "sources.payments"), bad=_set("sources.payments", {"a": 1})),
    _c("event-not-object", V, (AT3, "sources.payments[0]"), bad=_set("sources.payments.0", "paid")),
    _c("two-text-fields", V, ("bad.jsonl", "sources.apps"), bad=_set("sources.apps.0.note", "hi")),
    _c("field-missing-some-events", V, ("bad.jsonl", "minutes"), bad=_drop("sources.apps.1.minutes")),
    _c("unknown-top-key", V, (AT3, "labelz"), bad=_set("labelz", {})),
    _c("not-utf8", V, (AT3, "UTF-8"), bad=raw_line(2, b'{"user_id": "u02\xff\xfe", "sources": {}}')),
    _c("latin1-text", V, (AT3, "UTF-8"), bad=raw_line(2, '{"user_id": "u02", "sources": {"apps": [{"timestamp": 1, '
                                                         '"text": "caf\u00e9", "minutes": 1}]}}'.encode("latin-1"))),
    _c("malformed-json", V, (AT3, "malformed JSON"), bad=raw_line(2, '{"user_id": "u02", ')),
    _c("line-is-array", V, (AT3, "JSON object"), bad=raw_line(2, "[1, 2]")),
    _c("line-is-number", V, (AT3, "JSON object"), bad=raw_line(2, "42")),
    _c("empty-file", V, ("bad.jsonl", "no users"), bad=lambda rs: []),
    _c("blank-lines-only", V, ("bad.jsonl", "no users"), bad=lambda rs: ["", "   "]),
    _c("no-such-file", "data validate {d}/missing.jsonl", ("missing.jsonl", "not found")),
    _c("unknown-format", "data info {d}/users.csv", ("users.csv", "unknown data format"), files={"users.csv": "a,b\n"}),
    _c("synthetic-named-file-missing", "data info {d}/synthetic_users.jsonl", ("synthetic_users.jsonl",)),
    _c("synthetic-named-file-bad", "data validate {d}/synthetic_users.jsonl", ("synthetic_users.jsonl:3", "user_id"),
       bad=_set("user_id", ""), name="synthetic_users.jsonl"),
    _c("synthetics-word", "data info synthetics", ("unknown data set 'synthetics'",)),
    _c("synthetic-folder-named", "data info {d}/synthetic", ("synthetic",), files={"synthetic": None}),
    # a sidecar schema (users.schema.json) declares sources and tasks
    _c("schema-malformed", "data validate {d}/bad.jsonl", ("bad.schema.json", "malformed JSON"), bad=lambda rs: rs,
       files={"bad.schema.json": '{"sources": '}),
    _c("schema-not-object", "data validate {d}/bad.jsonl", ("bad.schema.json", "JSON object"), bad=lambda rs: rs,
       files={"bad.schema.json": [1, 2]}),
    _c("schema-task-kind", "data validate {d}/bad.jsonl", ("bad.schema.json", "tasks.churn.kind"), bad=lambda rs: rs,
       files={"bad.schema.json": {"tasks": {"churn": {"kind": "ordinal"}}}}),
    _c("schema-numeric-fields", "data validate {d}/bad.jsonl", ("bad.schema.json", "numeric_fields"),
       bad=lambda rs: rs, files={"bad.schema.json": {"sources": {"payments": {"numeric_fields": "amount"}}}}),
    _c("schema-undeclared-source", "data validate {d}/bad.jsonl", ("bad.jsonl:1", "unknown source 'apps'"),
       bad=lambda rs: rs, files={"bad.schema.json": {"sources": {"payments": {"numeric_fields": ["amount"]}}}}),
    _c("schema-unknown-class", "data validate {d}/bad.jsonl", ("bad.jsonl", "labels.plan", "unknown class"),
       bad=lambda rs: rs, files={"bad.schema.json": {
           "sources": {"payments": {"numeric_fields": ["amount"]}, "apps": {"numeric_fields": ["minutes"]}},
           "tasks": {"churn": {"kind": "binary"}, "plan": {"kind": "multiclass", "classes": ["basic", "plus"]}}}}),
    # the folder format
    _c("folder-no-dataset-json", "data validate {d}/folder", ("folder",), files={"folder": None}),
    _c("folder-dataset-json-malformed", "data validate {d}/folder", ("dataset.json", "malformed JSON"),
       files={"folder/dataset.json": "{"}),
    _c("folder-no-labels", "data validate {d}/folder", ("labels.parquet", "not found"),
       files={"folder/dataset.json": {"sources": {}, "tasks": {}}}),
    _c("folder-ts-nan", "data validate {d}/ds", ("ds, row 2", "payments.timestamp", "row 2"),
       setup=_folder("sources/payments.parquet", "timestamp", float("nan"))),
    _c("folder-ts-huge", "data validate {d}/ds", ("ds, row 2", "payments.timestamp", "row 2"),
       setup=_folder("sources/payments.parquet", "timestamp", 1e300)),
    _c("folder-ts-word", "data validate {d}/ds", ("ds, row 2", "payments.timestamp", "'tomorrow'"),
       setup=_folder("sources/payments.parquet", "timestamp", "tomorrow")),
    _c("folder-amount-inf", "data validate {d}/ds", ("ds, row 2", "payments.amount", "finite"),
       setup=_folder("sources/payments.parquet", "amount", float("inf"))),
    _c("folder-amount-nan", "data validate {d}/ds", ("ds, row 2", "payments.amount", "finite"),
       setup=_folder("sources/payments.parquet", "amount", float("nan"))),
    _c("folder-profile-inf", "data validate {d}/ds", ("ds, row 2", "profile.age", "finite"),
       setup=_folder("profile.parquet", "age", float("inf"))),
    _c("folder-amount-text", "data validate {d}/ds", ("ds, row 2", "payments.amount", "non-numeric"),
       setup=_folder("sources/payments.parquet", "amount", "lots")),
    _c("folder-unknown-class", "data validate {d}/ds", ("ds, row 2", "labels.plan", "unknown class 'gold'"),
       setup=_folder("labels.parquet", "plan", "gold")),
    _c("folder-bad-parquet", "data validate {d}/folder", ("pay.parquet", "Parquet"),
       files={"folder/dataset.json": {"sources": {"pay": {}}}, "folder/sources/pay.parquet": b"not parquet"}),
]

# ---- `pluribus data` commands ------------------------------------------------------------------------
DATA = [
    _c("fetch-unknown", "data fetch imagenet", ("imagenet", "unknown data set")),
    _c("synth-spec-letters", "data info synthetic:abc", ("synthetic:abc", "N")),
    _c("synth-spec-zero", "data info synthetic:0", ("synthetic:0",)),
    _c("synth-spec-negative", "data info synthetic:-5", ("synthetic:-5",)),
    _c("synth-spec-empty", "data info synthetic:", ("synthetic:",)),
    _c("synth-spec-float", "data info synthetic:3.5", ("synthetic:3.5",)),
    _c("synth-spec-exp", "data info synthetic:1e3", ("synthetic:1e3",)),
    _c("synth-spec-two", "data info synthetic:10:20", ("synthetic:10:20",)),
    _c("synth-spec-nan", "data info synthetic:nan", ("synthetic:nan",)),
    _c("synth-spec-huge", "data info synthetic:99999999999", ("synthetic:99999999999",)),
    _c("synth-users-zero", "data synth {d}/s.jsonl --users 0", ("--users",)),
    _c("synth-users-negative", "data synth {d}/s.jsonl --users -3", ("--users",)),
    _c("synth-users-text", "data synth {d}/s.jsonl --users many", ("--users", "many")),
    _c("synth-seed-negative", "data synth {d}/s.jsonl --seed -1", ("--seed",)),
    _c("synth-out-under-file", "data synth {d}/afile/s.jsonl --users 20", ("afile",), files={"afile": "x"}),
    _c("synth-out-readonly", "data synth {sys}/pluribus-out/s.jsonl --users 20", ("pluribus-out",)),
    _c("synth-folder-under-file", "data synth {d}/afile/folder --users 20", ("afile",), files={"afile": "x"}),
    _c("convert-out-under-file", "data convert {d}/good.jsonl {d}/afile/x.jsonl", ("afile",), files={"afile": "x"}),
    _c("convert-out-readonly", "data convert {d}/good.jsonl {sys}/pluribus-out", ("pluribus-out",)),
    _c("convert-onto-other-folder", "data convert {d}/good.jsonl {d}/mine", ("mine", "data set folder"),
       files={"mine/notes.txt": "my notes"}),
    _c("convert-onto-file", "data convert {d}/good.jsonl {d}/afile", ("afile",), files={"afile": "x"}),
    _c("convert-jsonl-onto-folder", "data convert {d}/good.jsonl {d}/x.jsonl", ("x.jsonl",), files={"x.jsonl": None}),
    _c("convert-bad-input", "data convert {d}/bad.jsonl {d}/out.jsonl", (AT3, "user_id"), bad=_set("user_id", "")),
    _c("info-missing-arg", "data info", ("SOURCE",)),
    _c("validate-unknown-option", "data validate {d}/good.jsonl --fast", ("--fast",)),
    _c("unknown-command", "data frobnicate", ("frobnicate",)),
]

# ---- console markup: text from the data is printed verbatim ------------------------------------------
MARKUP = [
    _c("markup-duplicate-id", V, ("[bold]u00[/bold]", "duplicate"),
       bad=edit(lambda rs: (rs[0].update(user_id="[bold]u00[/bold]"), rs[2].update(user_id="[bold]u00[/bold]")))),
    _c("markup-unknown-key", V, ("[red]extra",), bad=_set("[red]extra", 1)),
    _c("markup-path", "data validate {d}/[b]missing.jsonl", ("[b]missing.jsonl",)),
    _c("markup-label", V, ("labels.[i]x",), bad=_set("labels.[i]x", [1])),
]

# ---- the systems' commands: their data and output options --------------------------------------------
SYSTEMS = [
    _c("tokenize-bad-data", "tokenize fit {d}/bad.jsonl --out {d}/run", (AT3, "user_id"), bad=_set("user_id", "")),
    _c("tokenize-synth-zero", "tokenize fit synthetic:0 --out {d}/run", ("synthetic:0",)),
    _c("tokenize-synth-letters", "tokenize fit synthetic:x --out {d}/run", ("synthetic:x",)),
    _c("tokenize-missing-data", "tokenize fit {d}/nope.jsonl --out {d}/run", ("nope.jsonl",)),
    _c("tokenize-out-under-file", "tokenize fit {d}/good.jsonl --out {d}/afile/run", ("afile",), files={"afile": "x"}),
    _c("tokenize-out-readonly", "tokenize fit {d}/good.jsonl --out {sys}/pluribus-run", ("pluribus-run",)),
    _c("tokenize-config-missing", "tokenize fit --config {d}/none.toml --out {d}/run", ("none.toml",)),
    _c("tokenize-config-malformed", "tokenize fit --config {d}/c.toml --out {d}/run", ("c.toml", "TOML"),
       files={"c.toml": "epochs = = 2"}),
    _c("tokenize-encode-no-tokenizer", "tokenize encode {d}/good.jsonl --tokenizer {d}/none --out {d}/c.jsonl",
       ("none",)),
    _c("tokenize-eval-no-tokenizer", "tokenize eval {d}/good.jsonl --tokenizer {d}/none", ("none",)),
    _c("tokenize-epochs-zero", "tokenize fit {d}/good.jsonl --out {d}/run --epochs 0", ("epochs",)),
    _c("tokenize-holdout-big", "tokenize fit {d}/good.jsonl --out {d}/run --holdout 1.5", ("holdout",)),
    _c("tokenize-layout", "tokenize fit {d}/good.jsonl --out {d}/run --layout diagonal", ("layout", "diagonal")),
    _c("tokenize-no-sources", "tokenize fit {d}/bad.jsonl --out {d}/run", ("bad.jsonl", "source"),
       bad=_all(lambda r: r.update(sources={}))),
    _c("encoder-bad-data", "encoder train --data {d}/bad.jsonl --out {d}/run", (AT3, "user_id"),
       bad=_set("user_id", "")),
    _c("encoder-synth-zero", "encoder train --data synthetic:0 --out {d}/run", ("synthetic:0",)),
    _c("encoder-missing-data", "encoder train --data {d}/nope.jsonl --out {d}/run", ("nope.jsonl",)),
    _c("encoder-out-under-file", "encoder train --data {d}/good.jsonl --source payments --out {d}/afile/run", ("afile",),
       files={"afile": "x"}),
    _c("encoder-steps-zero", "encoder train --data {d}/good.jsonl --out {d}/run --steps 0", ("steps",)),
    _c("encoder-steps-negative", "encoder train --data {d}/good.jsonl --out {d}/run --steps -4", ("steps",)),
    _c("encoder-batch-zero", "encoder train --data {d}/good.jsonl --out {d}/run --batch-size 0", ("batch_size",)),
    _c("encoder-policy", "encoder train --data {d}/good.jsonl --out {d}/run --policy sideways", ("policy", "sideways")),
    _c("encoder-max-length-zero", "encoder train --data {d}/good.jsonl --out {d}/run --max-length 0", ("max_length",)),
    _c("encoder-config-missing", "encoder train --config {d}/none.toml --out {d}/run", ("none.toml",)),
    _c("encoder-embed-no-run", "encoder embed --run {d}/none", ("none",)),
    _c("encoder-eval-no-run", "encoder eval --run {d}/none", ("none",)),
    # impossible training options fail at once, before the model loads (the lr case took 76 s to reach AdamW)
    _c("encoder-lr-negative", "encoder train --data movielens-100k --out {d}/run --lr -1", ("--lr", "-1")),
    _c("encoder-lr-zero", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --lr 0", ("--lr", "> 0")),
    _c("encoder-lr-inf", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --lr inf", ("--lr",)),
    _c("encoder-batch-one", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --batch-size 1", ("--batch-size", "in-batch negatives")),
    _c("encoder-batch-negative", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --batch-size -3", ("--batch-size",)),
    _c("encoder-grad-accum-zero", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --grad-accum 0", ("--grad-accum",)),
    _c("encoder-max-events-zero", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --max-events 0", ("max_events",)),
    _c("encoder-temperature-zero", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("temperature", "> 0"),
       files={"c.toml": "[train]\ntemperature = 0\n"}),
    _c("encoder-temperature-negative", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("temperature",),
       files={"c.toml": "[train]\ntemperature = -0.5\n"}),
    _c("encoder-warmup-one", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("lr_warmup_ratio", "[0, 1)"),
       files={"c.toml": "[train]\nlr_warmup_ratio = 1.0\n"}),
    _c("encoder-warmup-negative", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("lr_warmup_ratio",),
       files={"c.toml": "[train]\nlr_warmup_ratio = -0.1\n"}),
    _c("encoder-checkpoint-every-zero", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("checkpoint_every",),
       files={"c.toml": "[train]\ncheckpoint_every = 0\n"}),
    _c("encoder-weight-decay-negative", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("weight_decay",),
       files={"c.toml": "[train]\nweight_decay = -1.0\n"}),
    _c("encoder-heldout-one", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --config {d}/c.toml", ("heldout",),
       files={"c.toml": "[pairs]\nheldout = 1.0\n"}),
    _c("encoder-source-unknown", "encoder train --data {d}/good.jsonl --out {d}/run --source nope", ("--source", "'nope'", "payments")),
    _c("encoder-source-ambiguous", "encoder train --data {d}/good.jsonl --out {d}/run", ("--source", "payments", "apps")),
    _c("encoder-future-last-zero", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --future-last 0", ("--future-last",)),
    _c("encoder-future-last-all", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --future-last 6", ("--future-last 6", "history")),
    _c("encoder-future-after-word", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --future-after tomorrow", ("--future-after", "'tomorrow'")),
    _c("encoder-future-after-late", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --future-after 2100-01-01", ("--future-after", "no")),
    _c("encoder-future-both", "encoder train --data {d}/good.jsonl --out {d}/run --source payments --future-last 2 --future-after 5",
       ("--future-last", "--future-after")),
    _c("encoder-future-on-movielens", "encoder train --data movielens-100k --out {d}/run --future-last 2",
       ("already holds out a future", "--future-last")),
    _c("fed-config-missing", "fed run --config {d}/none.toml --out {d}/run", ("none.toml",)),
    _c("fuse-config-out-of-range", "fuse run --config {d}/c.toml --out {d}/run", ("c.toml", "epsilon"),
       files={"c.toml": "[fusion]\nepsilon = -1.0\n"}),
    _c("fuse-config-is-a-folder", "fuse run --config {d}/cfg --out {d}/run", ("cfg", "folder"), files={"cfg": None}),
    _c("fed-config-malformed", "fed run --config {d}/c.toml --out {d}/run", ("c.toml", "TOML"),
       files={"c.toml": "steps = = 2"}),
    _c("fed-set-no-equals", "fed run --config {d}/c.toml --out {d}/run --set steps", ("--set", "steps"),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-set-unknown-key", "fed run --config {d}/c.toml --out {d}/run --set stepz=3", ("stepz",),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-set-steps-text", "fed run --config {d}/c.toml --out {d}/run --set steps=many", ("steps", "many"),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-set-steps-negative", "fed run --config {d}/c.toml --out {d}/run --set steps=-1", ("steps",),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-set-batch-zero", "fed run --config {d}/c.toml --out {d}/run --set batch_size=0", ("batch_size",),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-unknown-suite", "fed run --config {d}/c.toml --out {d}/run", ("suite", "nope"),
       files={"c.toml": 'suite = "nope"\nsteps = 2\n'}),
    _c("fed-init-under-file", "fed init-config {d}/afile/c.toml", ("afile",), files={"afile": "x"}),
    _c("fed-init-unknown-suite", "fed init-config {d}/c.toml --suite nope", ("suite", "nope")),
    _c("fed-flower-worker-inprocess", "fed flower --config {d}/c.toml --engine inprocess --worker",
       ("worker", "deployment"), files={"c.toml": "steps = 2\n"}),
    _c("fed-init-readonly", "fed init-config {sys}/pluribus-c.toml", ("pluribus-c.toml",)),
    _c("fed-flower-engine", "fed flower --config {d}/c.toml --engine grpc", ("--engine", "grpc"),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-flower-timeout-zero", "fed flower --config {d}/c.toml --timeout-s 0", ("timeout",),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-flower-cpus-zero", "fed flower --config {d}/c.toml --engine simulation --num-cpus 0", ("--num-cpus",),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-app-under-file", "fed flower-app {d}/afile/app --config {d}/c.toml", ("afile",),
       files={"afile": "x", "c.toml": "steps = 2\n"}),
    _c("fuse-dataset-unknown", "fuse run --dataset imagenet --out {d}/run", ("imagenet",)),
    _c("fuse-parties-zero", "fuse run --parties 0 --out {d}/run", ("parties",)),
    _c("fuse-parties-negative", "fuse run --parties -2 --out {d}/run", ("parties",)),
    _c("fuse-alpha-zero", "fuse run --alpha 0 --out {d}/run", ("alpha",)),
    _c("fuse-epsilon-negative", "fuse run --epsilon -1 --out {d}/run", ("epsilon",)),
    _c("fuse-epsilon-nan", "fuse run --epsilon nan --out {d}/run", ("epsilon",)),
    _c("fuse-mechanism", "fuse run --mechanism magic --out {d}/run", ("mechanism", "magic")),
    _c("fuse-solver", "fuse run --solver magic --out {d}/run", ("solver", "magic")),
    _c("fuse-match-tol-negative", "fuse run --match-tol -0.5 --out {d}/run", ("match_tol", "[0, 1)")),
    _c("fuse-match-tol-one", "fuse run --match-tol 1 --out {d}/run", ("match_tol",)),
    _c("fuse-match-start", "fuse run --match-start random --out {d}/run", ("match_start", "random")),
    _c("tokenize-threads-zero", "tokenize fit {d}/good.jsonl --out {d}/run --threads 0", ("--threads",)),
    _c("tokenize-threads-negative", "tokenize fit {d}/good.jsonl --out {d}/run --threads -2", ("--threads",)),
    _c("fuse-threads-zero", "fuse run --threads 0 --out {d}/run", ("--threads",)),
    _c("tokenize-encode-threads-zero", "tokenize encode {d}/good.jsonl --out {d}/c.jsonl --threads 0", ("--threads",)),
    _c("tokenize-eval-threads-negative", "tokenize eval {d}/good.jsonl --threads -1", ("--threads",)),
    _c("encoder-lr-nan", "encoder train --data {d}/good.jsonl --out {d}/run --lr nan", ("--lr", "not a number")),
    _c("fuse-epsilon-nan-word", "fuse run --epsilon NaN --out {d}/run", ("--epsilon", "not a number")),
    _c("fuse-alpha-nan", "fuse run --alpha nan --out {d}/run", ("--alpha", "not a number")),
    _c("fuse-mech-clip-nan", "fuse mechanisms --clip nan", ("--clip", "not a number")),
    _c("fed-flower-timeout-nan", "fed flower --config {d}/c.toml --timeout-s nan", ("--timeout-s", "not a number"),
       files={"c.toml": "steps = 2\n"}),
    _c("tokenize-holdout-nan", "tokenize fit {d}/good.jsonl --out {d}/run --holdout nan", ("--holdout", "not a number")),
    _c("fed-set-lr-nan", "fed run --config {d}/c.toml --out {d}/run --set client_lr=nan", ("client_lr", "nan"),
       files={"c.toml": "steps = 2\n"}),
    _c("fed-config-nan", "fed run --config {d}/c.toml --out {d}/run", ("c.toml", "client_lr", "nan"),
       files={"c.toml": "steps = 2\nclient_lr = nan\n"}),
    _c("tokenize-config-nan", "tokenize fit --config {d}/c.toml --out {d}/run", ("c.toml", "holdout", "nan"),
       files={"c.toml": "holdout = nan\n"}),
    _c("fuse-out-under-file", "fuse run --out {d}/afile/run", ("afile",), files={"afile": "x"}),
    _c("fuse-config-missing", "fuse run --config {d}/none.toml --out {d}/run", ("none.toml",)),
    _c("fuse-mech-epsilon-zero", "fuse mechanisms --epsilon 0", ("epsilon",)),
    _c("fuse-mech-clip-zero", "fuse mechanisms --clip 0", ("clip",)),
    _c("fuse-mech-delta", "fuse mechanisms --delta 2", ("delta",)),
    # `fuse train-parties --data`: parties from the user's own file
    _c("fuseparties-data-no-task", "fuse train-parties --data {d}/good.jsonl --out {d}/p", ("--data", "--task")),
    _c("fuseparties-unknown-task", "fuse train-parties --data {d}/good.jsonl --task nope --out {d}/p",
       ("--task", "'nope'", "churn")),
    _c("fuseparties-task-without-data", "fuse train-parties --task churn --out {d}/p", ("--task", "--data")),
    _c("fuseparties-data-and-dataset", "fuse train-parties --data {d}/good.jsonl --dataset digits --task churn --out {d}/p",
       ("--dataset", "--data")),
    _c("fuseparties-data-cnn", "fuse train-parties --data {d}/good.jsonl --task churn --model cnn --out {d}/p",
       ("--model", "'cnn'")),
    _c("fuseparties-over-users", "fuse train-parties --data {d}/good.jsonl --task churn --parties 20 --out {d}/p",
       ("--parties", "20", "14 training users")),
    # `fed prepare`: institutions from the user's own file
    _c("fedprep-unknown-label", "fed prepare {d}/good.jsonl --out {d}/p --tasks nope --institutions 2",
       ("--tasks", "'nope'", "churn")),
    _c("fedprep-empty-tasks", "fed prepare {d}/good.jsonl --out {d}/p --tasks , --institutions 2", ("--tasks",)),
    _c("fedprep-one-class-in-institution", "fed prepare {d}/bad.jsonl --out {d}/p --tasks churn --institution-column plan",
       ("bad.jsonl", "labels.churn", "'basic'", "one class"), bad=edit(lambda rs: [r["labels"].update(churn=0) for r in rs
                                                                         if r["labels"]["plan"] == "basic"])),
    _c("fedprep-column-missing-for-some", "fed prepare {d}/bad.jsonl --out {d}/p --tasks churn --institution-column plan",
       ("bad.jsonl", "labels.plan", "'u02'"), bad=_drop("labels.plan")),
    _c("fedprep-column-unknown", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn --institution-column region",
       ("--institution-column", "'region'", "tenure")),
    _c("fedprep-column-is-task", "fed prepare {d}/good.jsonl --out {d}/p --tasks plan --institution-column plan",
       ("--tasks", "'plan'", "institution column")),
    _c("fedprep-one-institution", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn --institutions 1",
       ("--institutions", "at least 2")),
    _c("fedprep-column-one-value", "fed prepare {d}/bad.jsonl --out {d}/p --tasks churn --institution-column tenure",
       ("--institution-column", "'tenure'", "at least 2"), bad=edit(lambda rs: [r["profile"].update(tenure=1.0) for r in rs])),
    _c("fedprep-institutions-over-users", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn --institutions 30",
       ("--institutions", "30", "24 users")),
    _c("fedprep-no-split", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn", ("--institution-column", "--institutions")),
    _c("fedprep-both-splits", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn --institutions 2 --institution-column plan",
       ("--institution-column", "--institutions")),
    _c("fedprep-more-tasks-than-institutions", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn,plan,churn --institutions 2",
       ("--tasks", "3 labels", "2 institutions")),
    _c("fedprep-unknown-features", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn --institutions 2 --features pca",
       ("--features", "'pca'", "simple")),
    _c("fedprep-steps-zero", "fed prepare {d}/good.jsonl --out {d}/p --tasks churn --institutions 2 --steps 0", ("--steps",)),
    _c("fedprep-out-is-file", "fed prepare {d}/good.jsonl --out {d}/afile --tasks churn --institutions 2", ("--out", "afile"),
       files={"afile": "x"}),
    _c("fedprep-missing-data", "fed prepare {d}/nope.jsonl --out {d}/p --tasks churn --institutions 2", ("nope.jsonl",)),
]

# ---- the demo -----------------------------------------------------------------------------------------
DEMO = [
    _c("demo-steps-empty", "demo --data synthetic:80 --out {d}/run --steps=", ("--steps", "data")),
    _c("demo-steps-comma", "demo --data synthetic:80 --out {d}/run --steps ,", ("--steps",)),
    _c("demo-steps-unknown", "demo --data synthetic:80 --out {d}/run --steps tokens", ("tokens", "tokenize")),
    _c("demo-steps-one-unknown", "demo --data synthetic:80 --out {d}/run --steps data,nope", ("nope",)),
    _c("demo-data-unknown", "demo --data movielens-1m --out {d}/run", ("unknown data set 'movielens-1m'",)),
    _c("demo-synth-zero", "demo --data synthetic:0 --out {d}/run", ("synthetic:0",)),
    _c("demo-synth-letters", "demo --data synthetic:ten --out {d}/run", ("synthetic:ten",)),
    _c("demo-bad-data", "demo --data {d}/bad.jsonl --out {d}/run", (AT3, TS), bad=_literal("timestamp", "NaN")),
    _c("demo-synthetic-named-bad-file", "demo --data {d}/synthetic.jsonl --out {d}/run",
       ("synthetic.jsonl:3",), bad=_set("user_id", ""), name="synthetic.jsonl"),
    _c("demo-engine", "demo --data synthetic:80 --out {d}/run --engine grpc", ("engine", "grpc")),
    _c("demo-out-under-file", "demo --data synthetic:80 --out {d}/afile/run --steps data", ("afile",),
       files={"afile": "x"}),
    _c("demo-out-is-file", "demo --data synthetic:80 --out {d}/afile --steps data", ("afile",), files={"afile": "x"}),
    _c("demo-out-readonly", "demo --data synthetic:80 --out {sys}/pluribus-demo --steps data", ("pluribus-demo",)),
    _c("demo-no-tasks", "demo --data {d}/bad.jsonl --out {d}/run --steps baseline", ("bad.jsonl", "task"),
       bad=_all(lambda r: r.pop("labels"))),
    _c("demo-regression-only", "demo --data {d}/bad.jsonl --out {d}/run --steps baseline", ("bad.jsonl", "task"),
       bad=_all(lambda r: r.update(labels={"spend": float(r["profile"]["age"]) * 1.5}))),
    _c("demo-no-sources", "demo --data {d}/bad.jsonl --out {d}/run --steps tokenize", ("bad.jsonl", "source"),
       bad=_all(lambda r: r.update(sources={}))),
    _c("demo-other-config", "demo --data synthetic:90 --out {d}/run --steps data", ("run", "different config"),
       files={"run/config.toml": 'data = "synthetic:80"\nquick = false\nseeds = [0, 1, 2]\nengine = "inprocess"\n'}),
]

ALL = LOADER + DATA + MARKUP + SYSTEMS + DEMO


def file_content(value: Any) -> bytes | None:
    """Bytes to write for a case's extra file (None: a folder)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")
