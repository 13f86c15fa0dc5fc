"""Appointment scheduler: book sessions with practitioners over HTTP/JSON.

Run it with ``python3 scheduler.py`` (``--help`` lists the options) and talk to it
with curl; the README documents every endpoint. Standard library only, Python 3.9+.

    POST   /appointments         {"user_id": "alice", "date": "2026-11-25", "time": "09:30"}
                                 (and an optional "note" for the practitioner)
    GET    /appointments?user_id=alice[&from=2026-11-01][&to=2026-11-30]
    GET    /appointments/alice/2026-11-25
    PATCH  /appointments/alice/2026-11-25   {"date": "2026-11-26"}  (a JSON merge patch)
    DELETE /appointments/alice/2026-11-25
    GET    /appointments.ics?user_id=alice
    GET    /healthz
    GET    /metrics              (Prometheus text format)
    GET    /openapi.json
    GET    /                     (a page, or JSON for Accept: application/json)
    GET    /docs                 (an API reference to try in a browser; its script: /docs.js)
    OPTIONS any path above, or * (which methods it takes; a browser's CORS preflight)

Lists, appointments, feeds, the description and the pages carry an ETag, and answer
If-None-Match with 304; every read and write answers an If-Match it fails with 412.

Appointments last APPOINTMENT_LENGTH and start at START_MINUTES past the hour, UTC
(the Domain section states each rule once). Any number of users may book the same
slot; each user may hold one appointment per date.

The file reads top to bottom, each section using only those above it, in two
parts. Part one is the scheduling service, everything a product change touches:

    Domain         the rules, each stated once, and their words; an appointment, its
                   fields' parsers and its details (DETAILS), a booking's outcomes
    Stores         where appointments live: InMemoryStore; SQLStore, the SQL of every
                   read and write that SQLiteStore and PostgresStore share
                   (SQLDatabase); SQLiteStore (SCHEMA_STEPS, frozen once shipped;
                   group commit as state machines: _Write, _Batch, _Turns); the
                   Idempotency-Keys they keep, each user's own (_once(), KeyTable)
    PostgreSQL     its protocol, version 3: the URI (parse_postgres_uri()), messages
                   built and read by functions over bytes, SCRAM; PGConnection, the
                   one class that owns such a socket; pg_connect(); PGPool
    PostgreSQL     PostgresStore: SQLStore's tables in a schema of its own, shared by
      store        any number of servers (PG_SCHEMA_STEPS); Batches of bookings and
                   reads, a round trip each
    Calendar feed  appointments as RFC 5545 iCalendar text
    Metrics        requests counted by route template, in Prometheus's text format
    Requests and   what a request is to the service (RequestHead, Request) and what it
      replies      gets (Reply; HTTPError, and http_error() for every other error):
                   bodies and JSON, entity tags and conditions, CORS; the route
                   table (ROUTES, @route) and match(); content negotiation
    Pages          the root page, and /docs: an API reference that its own script
                   renders from the description in the browser, with forms to try
    API            the OpenAPI description, built from the domain's rules
      description
    Service        what requests share, and a request's one path to its Reply:
                   begin(), then respond()
    Routes         the route functions, from parsed input to a Reply

Part two is an HTTP/1.1 runtime, reaching part one only through Service and Metrics
and the values they take and give:

    Wire format    HTTP/1.1 as functions over bytes and values, none touching a
                   socket: find_head(), parse_head(), keep_alive(), render_response()
    Connection     the one class that owns a client's socket: its phases (a state
                   machine, _NEXT_PHASES) and deadlines, reading and writing
    Shared metrics the workers' numbers in shared memory (MetricsTable)
    Server         SchedulerServer: connection slots, the deadline watchdog, the
                   log, shutdown
    Command line   options; main(), serve() (one process) and a Supervisor (--workers)
"""

from __future__ import annotations  # PEP 563: annotations are not evaluated at import

import abc
import argparse
import array
import base64
import binascii
import bisect
import collections
import contextlib
import datetime as dt
import decimal
import email.utils
import errno
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import math
import mmap
import operator
import os
import pwd
import re
import resource
import select
import shlex
import signal
import socket
import sqlite3
import ssl
import stringprep
import struct
import subprocess
import sys
import threading
import time
import traceback
import types
import unicodedata
import urllib.parse
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import (BinaryIO, Callable, ContextManager, Deque, Dict, List, Mapping,
                    NamedTuple, Optional, Sequence, TextIO, Tuple, Union)

__version__ = "1.0"
SERVICE_TITLE = "Appointment scheduler"
SERVER_NAME = f"scheduler/{__version__}"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


# ======================================================================================
# Part one: the scheduling service. What an appointment is, where appointments live,
# and what each request gets back: everything a change to the product touches. It
# knows nothing of sockets; part two carries its requests and replies.
# ======================================================================================

# --- Domain: what an appointment is ---------------------------------------------------
# The rules below are the service's, each stated once, here: the parsers apply them,
# and their messages, --help, the API description (the appendix: its text, patterns
# and examples) and the stores' checks are built from these constants, so that one
# change changes them all. Elsewhere, words name a rule's constant, not its value.

# The slot: how long an appointment lasts, and the minutes past the hour (UTC) at
# which one may start.
APPOINTMENT_LENGTH = dt.timedelta(minutes=30)
START_MINUTES = (0, 30)
# The dates that can be booked: recent enough for any calendar, far from datetime's
# limits, with four-digit years everywhere (JSON, iCalendar, SQLite, OpenAPI).
FIRST_DATE, LAST_DATE = dt.date(2000, 1, 1), dt.date(2099, 12, 31)
MAX_USER_ID_LENGTH = 256  # characters, counted in NFC (parse_user_id)
MAX_NOTE_LENGTH = 500  # characters, as sent (NOTE, parse_note)


def length_in_words() -> str:
    """APPOINTMENT_LENGTH as a sentence says it before a noun ("N-minute")."""
    return f"{APPOINTMENT_LENGTH // dt.timedelta(minutes=1)}-minute"


# START_MINUTES in words, for the sets that English has a name for; other sets are
# "at set minutes past the hour", and start_minutes_listed() says which.
_STARTS_IN_WORDS = {(0,): "on the hour", (0, 30): "on the hour or half hour",
                    (0, 15, 30, 45): "on the hour or quarter hour"}


def starts_in_words() -> str:
    """START_MINUTES as a sentence says when appointments start ("on the hour", say)."""
    return _STARTS_IN_WORDS.get(tuple(START_MINUTES), "at set minutes past the hour")


def start_minutes_listed() -> str:
    """START_MINUTES as two digits each, listed ("00, 20 or 40", say)."""
    minutes = [f"{minute:02d}" for minute in START_MINUTES]
    return " or ".join(minutes) if len(minutes) < 3 else \
        f"{', '.join(minutes[:-1])} or {minutes[-1]}"


def example_time() -> str:
    """A time that can be booked, for examples: the last start of nine o'clock."""
    return f"09:{START_MINUTES[-1]:02d}"


def example_unbookable_time() -> str:
    """A time of day that is not a start, for examples: halfway from nine o'clock's
    first start to the next."""
    following = START_MINUTES[1] if len(START_MINUTES) > 1 else START_MINUTES[0] + 60
    return f"09:{(START_MINUTES[0] + following) // 2 % 60:02d}"


# Control characters (Unicode category Cc) and lone surrogates (Cs), which JSON can
# carry as \u escapes but which cannot be encoded as UTF-8 later.
FORBIDDEN_CATEGORIES = ("Cc", "Cs")
# The characters of those categories, to look for in one search of a string; and the
# same but a line feed (U+000A), for text whose lines may break (a note).
_FORBIDDEN_IN_USER_ID = re.compile(r"[\u0000-\u001f\u007f-\u009f\ud800-\udfff]")
_FORBIDDEN_IN_NOTE = re.compile(r"[\u0000-\u0009\u000b-\u001f\u007f-\u009f\ud800-\udfff]")
# Anchored with fullmatch(); [0-9] rather than \d, which also matches non-ASCII digits.
DATE_FORMAT = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
TIME_FORMAT = re.compile(r"([0-9]{2}):([0-9]{2})")


class Appointment(NamedTuple):
    """A booked slot, APPOINTMENT_LENGTH long. Immutable, so it can be handed out
    freely. The fields after start are its details, as DETAILS describes them
    (None: none)."""

    user_id: str
    start: dt.datetime  # timezone-aware UTC, at one of START_MINUTES past the hour
    note: Optional[str] = None  # for the practitioner

    @property
    def date(self) -> dt.date:
        return self.start.date()

    @property
    def end(self) -> dt.datetime:
        return self.start + APPOINTMENT_LENGTH

    @property
    def details(self) -> Tuple[Optional[str], ...]:
        """Its details, in the order of DETAILS."""
        return self[2:]

    def as_json(self) -> dict:
        """The appointment as the API shows it: the fields it was booked with,
        plus its start and end as RFC 3339 UTC instants; details only where given."""
        date, time, start, end = _start_strings(self.start)
        shown = {"user_id": self.user_id, "date": date, "time": time, "start": start, "end": end}
        if self[2:] != _NO_DETAILS:  # one tuple comparison, not any(): this runs for every row
            shown.update((detail.name, value) for detail, value in zip(DETAILS, self[2:])
                         if value is not None)
        return shown


@functools.lru_cache(maxsize=4096)
def _start_strings(start: dt.datetime) -> Tuple[str, str, str, str]:
    """Date, time, start and end, as text, of an appointment starting at start.
    Cached: appointments share a few dozen starts a day, and each is listed often."""
    iso = start.isoformat()  # 2026-11-25T09:30:00+00:00
    return iso[:10], iso[11:16], iso[:19] + "Z", (start + APPOINTMENT_LENGTH).isoformat()[:19] + "Z"


class InvalidAppointment(ValueError):
    """Fields missing or invalid: errors lists (field, message) for every one;
    moving tells a reschedule's (parse_changes) from a booking's."""

    def __init__(self, errors: List[Tuple[str, str]], moving: bool = False):
        super().__init__(errors)
        self.errors, self.moving = errors, moving


class AlreadyBooked(Exception):
    """The user already holds an appointment that date: existing is that one."""

    def __init__(self, existing: Appointment):
        super().__init__(existing)
        self.existing = existing


class NotBooked(LookupError):
    """The user holds no appointment that date."""

    def __init__(self, user_id: str, date: dt.date):
        super().__init__(user_id, date)
        self.user_id, self.date = user_id, date


class ConditionFailed(Exception):
    """A change was asked for on a condition (If-Match) that the appointment as it
    is now does not meet: current is that appointment, unchanged."""

    def __init__(self, current: Appointment):
        super().__init__(current)
        self.current = current


# What a change may be made on: a test of the appointment as it is when the store
# changes it, under the same lock or in the same transaction (None: no condition).
Condition = Optional[Callable[[Appointment], bool]]


class Replay(NamedTuple):
    """A keyed write's response (Idempotency-Key), kept to be sent again to its
    retries, byte for byte; fingerprint tells a retry from another request."""

    fingerprint: bytes
    status: int
    media_type: Optional[str]
    headers: Tuple[Tuple[str, str], ...]
    body: Optional[bytes]


class Keyed(NamedTuple):
    """A write sent with an Idempotency-Key: the store keeps its response, render of
    its outcome (what it returned, or the outcome it raised; None: nothing to keep),
    in the same lock or transaction as the change. A key belongs to the user the
    request names, as Stripe's belong to an account: one user's keys never take
    another's room, and two users may use the same key."""

    user_id: str
    key: str
    fingerprint: bytes
    render: Callable[[object], Optional[Replay]]


class AlreadyKeyed(Exception):
    """The write's key is kept already: replay is the response kept for it."""

    def __init__(self, replay: Replay):
        super().__init__(replay)
        self.replay = replay


KEY_LIFETIME = 24 * 3600  # seconds a key's response is kept (the draft asks it published)
MAX_KEYS = 10_000  # keys kept at most, over all users (--max-idempotency-keys)...
MAX_KEYS_PER_USER = 100  # ...and for one user (--max-idempotency-keys-per-user)


class KeysFull(Exception):
    """No room to keep another Idempotency-Key: the user's keys (user_id), or every
    user's (user_id None), number limit, and each protects a change made within
    KEY_LIFETIME, so that forgetting one would let its retry make the change again.
    (Keys of requests that changed nothing make room first.) retry_after: seconds
    until the oldest of them expires."""

    def __init__(self, user_id: Optional[str], limit: int, retry_after: int):
        super().__init__(user_id, limit, retry_after)
        self.user_id, self.limit, self.retry_after = user_id, limit, retry_after


MAX_APPOINTMENTS_PER_USER = 1000  # held at most by one user (--max-appointments-per-user)


class StoreFull(Exception):
    """The store holds as many appointments as it may (capacity); or, when user_id
    is given, that user holds as many as one user may."""

    def __init__(self, capacity: int, user_id: Optional[str] = None):
        super().__init__(capacity, user_id)
        self.capacity, self.user_id = capacity, user_id


class StoreUnavailable(Exception):
    """The store cannot serve requests now; the message says why, to the client.
    retry_after: the seconds after which a retry may succeed, or None when retrying
    will not help until the operator acts (a damaged file, a full disk). cause: what
    the database itself said, for the operator's log alone (it may quote the
    schema's SQL)."""

    def __init__(self, message: str, retry_after: Optional[int] = 1,
                 cause: Optional[str] = None):
        super().__init__(message)
        self.retry_after, self.cause = retry_after, cause


# Each parser raises ValueError with a message that follows the field's name:
# "date" + " must be a string in YYYY-MM-DD format...".

# User IDs that no URL can hold as a path segment: a client removes them, with the
# segment before ".." (RFC 3986 section 5.2.4), and a browser does so for %2E and
# %2E%2E too (the URL standard's "single-dot" and "double-dot" segments).
DOT_SEGMENTS = (".", "..")


def parse_user_id(value) -> str:
    """Return the user ID as a string in NFC, Unicode's composed form; raise
    ValueError saying what is wrong.

    One visible ID is one user: text is normalized to NFC (so "José" typed with a
    combining accent is the user "José"), and every rule is checked on that form,
    which is what the service stores and shows back; its length too.

    A JSON integer is accepted as its decimal string, so 42 and "42" are one user.
    Integers are JSON Schema's: any number without a fraction, so 42.0 and 4.2e1
    are 42 too (decode_json reads numbers with a point as Decimal, exactly).
    """
    if isinstance(value, decimal.Decimal) and value.is_finite():
        if value.copy_abs() >= 10 ** MAX_USER_ID_LENGTH:  # exact: abs() rounds to 28 digits
            raise ValueError(f"must be at most {MAX_USER_ID_LENGTH} characters long")
        if value == value.to_integral_value():
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):  # bool is an int
        if abs(value) >= 10 ** MAX_USER_ID_LENGTH:  # checked before str(): that is slow on huge ints
            raise ValueError(f"must be at most {MAX_USER_ID_LENGTH} characters long")
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("must be a string or an integer")
    if not value:
        raise ValueError("must not be empty")
    ascii_only = value.isascii()  # then it is in NFC already, and has no invisible characters
    if not ascii_only and len(value) <= MAX_USER_ID_LENGTH * _MOST_JOINED_BY_NFC:
        value = unicodedata.normalize("NFC", value)
    if len(value) > MAX_USER_ID_LENGTH:
        raise ValueError(f"must be at most {MAX_USER_ID_LENGTH} characters long"
                         + ("" if ascii_only else " (counted in NFC, Unicode's composed form)"))
    if _FORBIDDEN_IN_USER_ID.search(value):
        raise ValueError("must not contain control characters or lone surrogates")
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    if value in DOT_SEGMENTS:
        raise ValueError(f"must not be {' or '.join(DOT_SEGMENTS)}: an appointment's URL "
                         "could not hold it")
    invisible = None if ascii_only else _invisible_character(value, look_alikes=True)
    if invisible:
        raise ValueError(f"must not contain the invisible character U+{ord(invisible):04X} "
                         f"({unicodedata.name(invisible, 'unnamed: a reserved code point')})")
    return value


# NFC joins at most 4 code points into one (no character's canonical decomposition
# is longer), so text longer than this many times the limit is too long in NFC too.
_MOST_JOINED_BY_NFC = 4
JOINERS = "\u200c\u200d"  # zero width non-joiner and joiner: in emoji and in joining scripts
INVISIBLE_CATEGORIES = ("Cf", "Zl", "Zp")  # format characters, line and paragraph separators
VISIBLE_CLASSES = "LMS"  # letters, marks, symbols: what a joiner may stand between
# Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt, the same
# from Unicode 14.0 to 15.1: Python 3.11 to 3.13; before 14.0, U+180F was reserved):
# characters a renderer shows as nothing when it has no glyph for them. Python's
# unicodedata does not have it. Ranges (first, last), reserved code points included.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF))
# Blank characters that are not default-ignorable, which fonts draw as nothing: the
# braille pattern with no dots and the musical null notehead.
BLANK_LOOK_ALIKES = "\u2800\U0001d159"
# What a user ID may not hold, beyond the invisible categories but for the exceptions below.
_LOOK_ALIKES = frozenset(chr(code) for first, last in DEFAULT_IGNORABLE
                         for code in range(first, last + 1)) | frozenset(BLANK_LOOK_ALIKES)
# Text and emoji presentation selectors (VS15, VS16): allowed in a user ID after an
# emoji only. Python has no Emoji property: an emoji is taken to be a symbol beyond
# ASCII (category S), or one of the few emoji that are not symbols (these); and
# VS16 in a keycap (1, VS16, U+20E3 COMBINING ENCLOSING KEYCAP: 1️⃣).
VARIATION_SELECTORS = "\ufe0e\ufe0f"
EMOJI_BEYOND_SYMBOLS = "\u203c\u2049\u2139\u3030\u303d"  # ‼ ⁉ ℹ 〰 〽
KEYCAP_BASES, KEYCAP = "#*0123456789", "\u20e3"


def _invisible_character(value: str, look_alikes: bool) -> Optional[str]:
    """The first character in value that would make two different IDs look alike,
    or reverse the text around it: a format character (Unicode category Cf), but a
    joiner between two visible characters that are not ASCII (as in an emoji
    sequence like 👩‍💻, or a Persian or Indic word); a line or paragraph separator
    (Zl, Zp), which breaks the line wherever the ID is shown. With look_alikes, also
    a default-ignorable character or a blank look-alike (DEFAULT_IGNORABLE,
    BLANK_LOOK_ALIKES), but a variation selector after an emoji (VARIATION_SELECTORS)."""
    for index, char in enumerate(value):
        if unicodedata.category(char) not in INVISIBLE_CATEGORIES and not (
                look_alikes and char in _LOOK_ALIKES):
            continue
        if char in JOINERS and 0 < index < len(value) - 1 and all(
                not near.isascii() and unicodedata.category(near)[0] in VISIBLE_CLASSES
                for near in (value[index - 1], value[index + 1])):
            continue
        if char in VARIATION_SELECTORS and index and _emoji_before(value, index):
            continue
        return char
    return None


def _emoji_before(value: str, index: int) -> bool:
    """Whether the variation selector at value[index] follows an emoji (see
    VARIATION_SELECTORS): a symbol beyond ASCII, an emoji that is not a symbol, or
    a keycap's base, with VS16 and U+20E3 after it."""
    before = value[index - 1]
    if not before.isascii():
        return unicodedata.category(before)[0] == "S" or before in EMOJI_BEYOND_SYMBOLS
    return before in KEYCAP_BASES and value[index] == "\ufe0f" and \
        value[index + 1:index + 2] == KEYCAP


def parse_date(value) -> dt.date:
    """Return the calendar date for a YYYY-MM-DD string; raise ValueError otherwise."""
    match = DATE_FORMAT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("must be a string in YYYY-MM-DD format, e.g. 2026-11-25")
    try:
        date = dt.date.fromisoformat(value)  # DATE_FORMAT's form, which every version reads
    except ValueError:
        raise ValueError(f"{value} is not a real calendar date") from None
    if not FIRST_DATE <= date <= LAST_DATE:
        raise ValueError(f"{value} is outside the dates that can be booked, {FIRST_DATE} "
                         f"to {LAST_DATE}")
    return date


@functools.lru_cache(maxsize=4)
def _day_starts(minutes: Tuple[int, ...]) -> Dict[str, dt.time]:
    """Every start of a day at these minutes past the hour, as HH:MM, with its time:
    what parse_time() accepts, looked up in one step."""
    return {f"{hour:02d}:{minute:02d}": dt.time(hour, minute)
            for hour in range(24) for minute in minutes}


def parse_time(value) -> dt.time:
    """Return the start time for an HH:MM string at one of START_MINUTES past the
    hour; raise ValueError otherwise."""
    start = _day_starts(tuple(START_MINUTES)).get(value) if isinstance(value, str) else None
    if start is not None:  # a bookable time: the checks below would take it
        return start
    match = TIME_FORMAT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"must be a string in 24-hour HH:MM format, e.g. {example_time()}; "
                         f"appointments start {starts_in_words()}")
    hour, minute = map(int, match.groups())
    if hour > 23:
        raise ValueError(f"{value} is not a time of day: hours run from 00 to 23")
    if minute not in START_MINUTES:
        raise ValueError(f"{value} is not bookable: appointments start {starts_in_words()} "
                         f"(minutes {start_minutes_listed()})")
    return dt.time(hour, minute)


FIELDS = (("user_id", parse_user_id), ("date", parse_date), ("time", parse_time))  # in order


class FreeText(NamedTuple):
    """The rule of a detail that is free text, kept as written (not normalized): at
    most max_length characters as sent; no control characters but, if its lines may
    break (line_breaks), line feeds (CR LF is kept as one); no lone surrogates; no
    invisible format characters but joiners between visible non-ASCII characters.
    An empty one is none. parse() applies it; the API description's maxLength and
    pattern for the detail are built from it (the appendix's text_pattern())."""

    max_length: int  # characters, as sent
    line_breaks: bool

    def parse(self, value) -> Optional[str]:
        """Return the text (None for an empty one: none); raise ValueError saying
        what is wrong."""
        if not isinstance(value, str):
            raise ValueError("must be a string (or null for none)")
        if len(value) > self.max_length:  # as sent
            raise ValueError(f"must be at most {self.max_length} characters long")
        if self.line_breaks:
            value = value.replace("\r\n", "\n")
            control = _FORBIDDEN_IN_NOTE.search(value)
        else:
            control = _FORBIDDEN_IN_USER_ID.search(value)
        if control:
            raise ValueError(f"must not contain control characters (U+{ord(control.group()):04X}) "
                             + ("but line breaks, nor lone surrogates" if self.line_breaks
                                else "nor lone surrogates"))
        invisible = None if value.isascii() else _invisible_character(value, look_alikes=False)
        if invisible:
            raise ValueError(f"must not contain the invisible character U+{ord(invisible):04X} "
                             f"({unicodedata.name(invisible, 'a format character')})")
        return value or None


NOTE = FreeText(MAX_NOTE_LENGTH, line_breaks=True)  # the note's rule


def parse_note(value) -> Optional[str]:
    """Return the note (None for an empty one: no note); raise ValueError saying what
    is wrong. The note's rule is NOTE: lines may break (a line feed; CR LF is kept as
    one); other control characters and invisible format characters may not be there."""
    return NOTE.parse(value)


class Detail(NamedTuple):
    """An optional field of an appointment beyond its user and start, described
    once: the parsers, both SQL stores' checks, the feed and the API description
    take it from DETAILS, its rule (text) included. Appointment has a field of the
    same name; SQLite and PostgreSQL a column, added by a schema step of each."""

    name: str
    text: FreeText  # its rule
    description: str  # what it is for, for the API description (which adds the rule's words)
    ical_property: str  # what the feed shows it as (RFC 5545 section 3.8)

    @property
    def parse(self) -> Callable[[object], Optional[str]]:
        """Its parser: a request's value as stored; None for none."""
        return self.text.parse


DETAILS = (Detail("note", NOTE, "Free text for the practitioner", "DESCRIPTION"),)
_DETAIL_NAMES = tuple(detail.name for detail in DETAILS)
_NO_DETAILS = (None,) * len(DETAILS)  # an appointment's details when it has none
# Every field a request may give, with its parser: the FIELDS, then the details.
_PARSERS = FIELDS + tuple((detail.name, detail.parse) for detail in DETAILS)


def _parse_fields(fields: Mapping, missing: Optional[str] = None,
                  null: Optional[str] = None) -> Tuple[dict, List[Tuple[str, str]]]:
    """The FIELDS and DETAILS that fields holds, parsed by name; and (field,
    message) for each that is invalid, or a FIELD missing (if missing says why that
    is wrong) or null (if null says why). A detail's null is None: none."""
    values, errors = {}, []
    for name, parse in _PARSERS:
        if name not in fields:
            if missing and name not in _DETAIL_NAMES:
                errors.append((name, f"{name} {missing}"))
        elif fields[name] is None and (null or name in _DETAIL_NAMES):
            if name in _DETAIL_NAMES:
                values[name] = None
            else:
                errors.append((name, f"{name} {null}"))
        else:
            try:
                values[name] = parse(fields[name])
            except ValueError as error:
                errors.append((name, f"{name} {error}"))
    return values, errors


def parse_appointment(fields: Mapping) -> Appointment:
    """Build an Appointment from a request's fields (unknown ones are ignored).

    Raises InvalidAppointment naming every missing or invalid field at once.
    """
    values, errors = _parse_fields(fields, missing="is required")
    if errors:
        raise InvalidAppointment(errors)
    start = dt.datetime.combine(values["date"], values["time"], tzinfo=dt.timezone.utc)
    return Appointment(values["user_id"], start, *map(values.get, _DETAIL_NAMES))


class Changes(NamedTuple):
    """What a merge patch changes: date and time (None: unchanged), and the details
    it names, by name (None: removed)."""

    date: Optional[dt.date] = None
    time: Optional[dt.time] = None
    details: Mapping[str, Optional[str]] = types.MappingProxyType({})  # read-only

    def applied(self, appointment: Appointment) -> Appointment:
        """The appointment with these changes made to it."""
        start = dt.datetime.combine(self.date or appointment.start.date(),
                                    self.time or appointment.start.time(),
                                    tzinfo=dt.timezone.utc)
        return appointment._replace(start=start, **self.details)


# What an appointment shows (Appointment.as_json()) that follows from its date and time.
_DERIVED = ("start", "end")


def parse_changes(patch: Mapping, user_id: str) -> Changes:
    """What a JSON merge patch (RFC 7396) of user_id's appointment asks for. Other
    fields are ignored, as in a booking, but user_id, if given, must be the
    appointment's own; start and end, if given, must be what the patch's date and
    time make them; null removes a detail, and cannot remove date or time.
    Raises InvalidAppointment naming every invalid field at once."""
    # In a merge patch, null removes the member.
    changes, errors = _parse_fields(patch, null="cannot be removed; leave it out to keep it")
    if changes.get("user_id", user_id) != user_id:
        errors.append(("user_id", f"user_id cannot be changed: the appointment is {user_id}'s; "
                                  "the other user books one of their own"))
    # A client may send back what it was shown, changed. Were start and end ignored, one
    # that changed them would be told the appointment moved when it did not: a patch is
    # applied whole or not at all (RFC 5789 section 2).
    given = [name for name in _DERIVED if name in patch]
    if given and not any(field in ("date", "time") for field, _ in errors):
        if "date" in changes and "time" in changes:
            shown = Appointment(user_id, dt.datetime.combine(
                changes["date"], changes["time"], tzinfo=dt.timezone.utc)).as_json()
            errors += [(name, f"{name} must be {shown[name]}, as date and time make it; "
                              "change date and time to move the appointment")
                       for name in given if patch[name] != shown[name]]
        else:
            errors += [(name, f"{name} follows from date and time: give both with it, or "
                              "leave it out") for name in given]
    if errors:
        raise InvalidAppointment(errors, moving=True)
    return Changes(changes.get("date"), changes.get("time"),
                   {name: changes[name] for name in _DETAIL_NAMES if name in changes})


class Event(NamedTuple):
    """An appointment as a calendar keeps it (RFC 5545's VEVENT): one event from its
    booking to its cancellation, across moves and changes of its details. key tells
    it from every other event of its user, ever (event_key(); the feed's UID is made
    of it). sequence counts its changes: 0 as booked, one more for each change of
    its start or a detail (a change to what it already is is none). modified is
    when it last changed (as booked, at first); None where that is not known."""

    appointment: Appointment
    key: str
    sequence: int = 0
    modified: Optional[dt.datetime] = None


@functools.lru_cache(maxsize=4096)
def _start_key(start: dt.datetime) -> str:
    """The start as iCalendar writes a UTC instant. Cached, as _start_strings() is
    (which a booking's reply then finds the start's hash kept for)."""
    return start.strftime("%Y%m%dT%H%M%SZ")


def event_key(start: dt.datetime, stamp: Optional[int] = None) -> str:
    """The key of the event booked for start at stamp (microseconds since the epoch,
    by a store's clock): the start as iCalendar writes it, then the stamp. Two of a
    user's events have one key only if both were booked for one start in one
    microsecond, one cancelled in between: the user holds one appointment a date.
    An appointment booked before events were kept (stamp None) has its start for
    key, and keeps it when it moves (SQLStore): the feed's UID was made of the start
    then, so that an upgrade shows subscribers the events they had."""
    return _start_key(start) if stamp is None else f"{_start_key(start)}-{stamp}"


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def stamp_time(stamp: int) -> Optional[dt.datetime]:
    """A stamp (microseconds since the epoch) as a UTC datetime; None for one
    datetime cannot hold (written past the store)."""
    try:
        return _EPOCH + dt.timedelta(microseconds=stamp)
    except OverflowError:
        return None


# --- Stores ---------------------------------------------------------------------------

_OUTCOMES = (AlreadyBooked, NotBooked, ConditionFailed, StoreFull)  # what a write may raise


class KeyTable(abc.ABC):
    """The Idempotency-Keys a store keeps, each with the response it protects, as
    _once() uses them: always under the store's lock or in the write's transaction.
    A key is found by its user and itself. "Unchanged" keys are those of requests
    that changed nothing (a 404, a 409): their retry would get the same answer
    from the store again, so they are the first forgotten to make room."""

    @abc.abstractmethod
    def forget_expired(self, before: float) -> None:
        """Forget the keys kept before that time (time.time())."""

    @abc.abstractmethod
    def find(self, user_id: str, key: str) -> Optional[Replay]:
        """The response kept for the user's key, if any."""

    @abc.abstractmethod
    def held(self, user_id: Optional[str]) -> int:
        """How many keys the user holds (None: every user)."""

    @abc.abstractmethod
    def forget_unchanged(self, user_id: Optional[str]) -> bool:
        """Forget the oldest unchanged key of the user (None: of any user); False if
        there is none."""

    @abc.abstractmethod
    def oldest(self, user_id: Optional[str]) -> float:
        """When the oldest key of the user (None: of any user) was kept."""

    @abc.abstractmethod
    def keep(self, user_id: str, key: str, changed: bool, replay: Replay) -> None:
        """Keep the response for the user's key, kept now."""


def _once(keyed: Optional[Keyed], keys: KeyTable, limits: Tuple[int, int],
          perform: Callable[[], object]):
    """perform() a write once per key: the response kept for keyed's key, if any, is
    raised (AlreadyKeyed); else the write is performed and its outcome's response
    kept, whatever the outcome. limits: the keys one user, then all users, may
    hold. Unchanged keys make room: the user's own first, and at the total, if the
    user has none, the oldest of any user's. The retry of a request whose key was forgotten is
    performed again rather than refused; that is acceptable, since such a key
    only kept a 404 or a 409. KeysFull is raised when no key can make room, before
    anything is performed, so that nothing is ever done that a retry could do
    again. Run it under the store's lock or in the write's transaction, so that
    two writes with one key never both perform."""
    if keyed is None:
        return perform()
    now = time.time()
    keys.forget_expired(now - KEY_LIFETIME)
    replay = keys.find(keyed.user_id, keyed.key)
    if replay is not None:
        raise AlreadyKeyed(replay)
    for user_id, limit in zip((keyed.user_id, None), limits):
        while keys.held(user_id) >= limit:  # the user's own unchanged keys make room first
            if not (keys.forget_unchanged(keyed.user_id)
                    or user_id is None and keys.forget_unchanged(None)):
                raise KeysFull(user_id, limit,
                               max(1, math.ceil(keys.oldest(user_id) + KEY_LIFETIME - now)))
    try:
        result = perform()
    except _OUTCOMES as outcome:
        replay = keyed.render(outcome)
        if replay is not None:
            keys.keep(keyed.user_id, keyed.key, False, replay)
        raise
    replay = keyed.render(result)
    if replay is not None:
        keys.keep(keyed.user_id, keyed.key, True, replay)
    return result


class Store(abc.ABC):
    """Where appointments live. Every method is safe to call from many threads at
    once, and returns immutable Appointments or new lists, never internal state.
    A new store implements the abstract methods; the tests' StoreContract holds it
    to them.

    What it holds is bounded: capacity appointments over all users (None: no
    bound), user_capacity for one user, max_keys Idempotency-Keys over all users
    and max_keys_per_user for one.

    The three writes (book, reschedule, cancel) take keyed, the Keyed of a
    request's Idempotency-Key. The first write with a key keeps the response that
    keyed renders of its outcome, together with the change, for KEY_LIFETIME
    seconds. A later write with that key changes nothing, and raises AlreadyKeyed
    with that response. KeysFull is raised when there is no room to keep another
    key (_once()).

    Methods for the caller (Service and its routes):

    - book(appointment, keyed), get(user_id, date), reschedule(user_id, date,
      changes, condition, keyed), cancel(user_id, date, condition, keyed)
    - list_for_user(user_id, first, last), events(user_id), version(user_id)
    - check(), for /healthz; count(), count_keys() and samples(), for /metrics
    - close()

    Methods a subclass must define: every one marked abstract (a subclass that
    leaves one out cannot be made: TypeError).

    Methods that may be overridden: check() (calling this one), samples(),
    close().

    Each appointment is an Event as well, from its booking to its cancellation:
    book() makes a new one and reschedule() changes it; events() shows them.
    They are stamped by clock(), time.time_ns() (nanoseconds since the epoch)
    unless a test sets another."""

    capacity: Optional[int] = None  # appointments held at most; None: no limit
    clock: Callable[[], int] = staticmethod(time.time_ns)
    user_capacity: int = MAX_APPOINTMENTS_PER_USER
    max_keys: int = MAX_KEYS
    max_keys_per_user: int = MAX_KEYS_PER_USER

    @abc.abstractmethod
    def book(self, appointment: Appointment, keyed: Optional[Keyed] = None) -> Appointment:
        """Store the appointment, as a new event (a key none of the user's events
        had, sequence 0, modified now), and return it. Raises AlreadyBooked,
        carrying the existing appointment, when the user already has one that date;
        StoreFull with the user's ID when the user holds user_capacity, and without
        one when the store holds its capacity."""

    @abc.abstractmethod
    def get(self, user_id: str, date: dt.date) -> Appointment:
        """The user's appointment on that date; NotBooked when there is none."""

    @abc.abstractmethod
    def cancel(self, user_id: str, date: dt.date, condition: Condition = None,
               keyed: Optional[Keyed] = None) -> None:
        """Delete the user's appointment on that date; NotBooked when there is none,
        and ConditionFailed when condition does not hold for it."""

    @abc.abstractmethod
    def reschedule(self, user_id: str, date: dt.date, changes: Changes,
                   condition: Condition = None, keyed: Optional[Keyed] = None) -> Appointment:
        """Change the user's appointment on date as changes says (move it, change its
        details) in one step, and return it changed: the same event, its sequence
        one more and modified now; unless it was already as changes says, when
        nothing changes. Raises NotBooked when there is none on date,
        AlreadyBooked, carrying it, when the user holds another on the new date,
        and only then ConditionFailed when condition does not hold for the
        appointment as it is; nothing changes then."""

    @abc.abstractmethod
    def list_for_user(self, user_id: str, first: Optional[dt.date] = None,
                      last: Optional[dt.date] = None) -> List[Appointment]:
        """The user's appointments from first to last (inclusive, each optional),
        sorted by start; empty for an unknown user."""

    @abc.abstractmethod
    def events(self, user_id: str) -> List[Event]:
        """The user's appointments as events, sorted by start; empty for an unknown
        user."""

    @abc.abstractmethod
    def version(self, user_id: str) -> object:
        """A value that tells whether the user's appointments changed: while it is
        equal (==) to one it returned before, they are as they were then. Taken
        before reading them, it says what a representation of them is valid for."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many appointments are stored, over all users."""

    @abc.abstractmethod
    def count_keys(self) -> int:
        """How many Idempotency-Keys are kept, over all users."""

    notices: Tuple[str, ...] = ()  # what opening the store did, a sentence each, for the log

    def check(self) -> None:
        """Raise StoreUnavailable if the store cannot take bookings now, and StoreFull
        if it holds its capacity (a booking would raise it)."""
        if self.capacity is not None and self.count() >= self.capacity:
            raise StoreFull(self.capacity)

    def samples(self) -> List[tuple]:
        """What /metrics shows of this process's store: (name, type, help text, value)
        each, added up over the workers with --workers. This one shows nothing; a
        store may override it."""
        return []

    def close(self) -> None:
        """Release what the store holds; it is not used afterwards."""


class _MemoryKeys(KeyTable):
    """InMemoryStore's keys: all of them in the order kept, each user's, and the
    unchanged ones, so that each question is answered without a search (but for
    one user's oldest unchanged key, among at most max_keys_per_user)."""

    def __init__(self):
        # (user ID, key) -> (when kept, changed, its response), oldest first
        self._all: "collections.OrderedDict[Tuple[str, str], Tuple[float, bool, Replay]]" = \
            collections.OrderedDict()
        self._by_user: Dict[str, Dict[str, None]] = {}  # each user's keys, oldest first
        self._unchanged: "collections.OrderedDict[Tuple[str, str], None]" = \
            collections.OrderedDict()

    def _forget(self, user_id: str, key: str) -> None:
        del self._all[user_id, key]
        self._unchanged.pop((user_id, key), None)
        mine = self._by_user[user_id]
        del mine[key]
        if not mine:
            del self._by_user[user_id]

    def forget_expired(self, before: float) -> None:
        while self._all:
            (user_id, key), (kept, _, _) = next(iter(self._all.items()))
            if kept >= before:
                return
            self._forget(user_id, key)

    def find(self, user_id: str, key: str) -> Optional[Replay]:
        found = self._all.get((user_id, key))
        return None if found is None else found[2]

    def held(self, user_id: Optional[str]) -> int:
        return len(self._all) if user_id is None else len(self._by_user.get(user_id, ()))

    def forget_unchanged(self, user_id: Optional[str]) -> bool:
        if user_id is None:
            found = next(iter(self._unchanged), None)
        else:
            found = next(((user_id, key) for key in self._by_user.get(user_id, ())
                          if (user_id, key) in self._unchanged), None)
        if found is None:
            return False
        self._forget(*found)
        return True

    def oldest(self, user_id: Optional[str]) -> float:
        if user_id is not None:
            return self._all[user_id, next(iter(self._by_user[user_id]))][0]
        return next(iter(self._all.values()))[0]

    def keep(self, user_id: str, key: str, changed: bool, replay: Replay) -> None:
        self._all[user_id, key] = (time.time(), changed, replay)
        self._by_user.setdefault(user_id, {})[key] = None
        if not changed:
            self._unchanged[user_id, key] = None


class _Dates(dict):
    """A user's appointments by date, once there are two or more; version changes
    with every change (Store.version())."""

    __slots__ = ("version",)


# InMemoryStore keeps an appointment without details, as booked, in one int: the
# stamp it was booked at, in the low _STAMP_BITS (to the year 4253), and above them
# the minute it starts at, counted from 0001-01-01 (toordinal() * 1440 + hour * 60 +
# minute), so that such ints sort by start. An int of this size (89 bits at most) is
# smaller than a datetime alone.
_STAMP_BITS = 56
_STAMPS = (1 << _STAMP_BITS) - 1


class _Starts(dict):
    """The start at each minute (counted as InMemoryStore counts them), made when
    first asked for and kept, up to 4,096 (then it starts again): appointments share
    a few dozen starts a day. A dict's lookup, not an lru_cache's call: a listing
    makes one for each appointment."""

    def __missing__(self, minute: int) -> dt.datetime:
        if len(self) >= 4096:
            self.clear()
        day, time_of_day = divmod(minute, 1440)
        start = self[minute] = dt.datetime.combine(
            dt.date.fromordinal(day), dt.time(*divmod(time_of_day, 60)), tzinfo=dt.timezone.utc)
        return start


_START_AT = _Starts()


def _birth_key(birth: int) -> str:
    """The event key of an appointment kept as birth was (the minute and stamp of its
    booking)."""
    return event_key(_START_AT[birth >> _STAMP_BITS], birth & _STAMPS)


class _Kept(NamedTuple):
    """What InMemoryStore keeps of an appointment with details, or changed since it
    was booked: the appointment, its birth (the int it would have been kept as
    when booked), its event's sequence and when it last changed (a stamp)."""

    appointment: Appointment
    birth: int
    sequence: int
    modified: int


class InMemoryStore(Store):
    """Appointments in a dict, shared safely by the request threads; the default.

    It maps each user ID to what the user holds: the one appointment, or, once
    there are two or more, a _Dates of them by date. An appointment is kept as one
    int (its start and the stamp it was booked at) until it has details or
    changes, then as a _Kept. Most members hold one appointment without details,
    and a dict of one entry would take more memory than the rest of it (README,
    Performance). Ints, dates and datetimes are immutable and untracked by the
    garbage collector, so a large store stays cheap.
    """

    def __init__(self, capacity: Optional[int] = None, max_keys: int = MAX_KEYS, *,
                 user_capacity: int = MAX_APPOINTMENTS_PER_USER,
                 max_keys_per_user: int = MAX_KEYS_PER_USER):
        self.capacity = capacity  # appointments held at most; None: no limit
        self.user_capacity = user_capacity
        self.max_keys, self.max_keys_per_user = max_keys, max_keys_per_user
        self._lock = threading.Lock()  # guards everything below
        self._by_user: Dict[str, Union[int, _Kept, _Dates]] = {}
        self._count = 0
        self._keys = _MemoryKeys()
        self._versions = itertools.count(1)  # for _Dates.version
        self._stamped = 0  # the last stamp

    def _once_per_key(self, keyed: Optional[Keyed], perform: Callable[[], object]):
        """perform() once per key (_once()), under the lock."""
        with self._lock:
            if keyed is None:  # no key: none of _once()'s work
                return perform()
            return _once(keyed, self._keys, (self.max_keys_per_user, self.max_keys), perform)

    def _stamp(self) -> int:
        """The stamp of a change made now, under the lock: microseconds since the
        epoch, and after every stamp before, so that no two events are born at one."""
        stamp = self.clock() // 1000
        if stamp <= self._stamped:  # (not max(): this is cheaper, and runs for every booking)
            stamp = self._stamped + 1
        self._stamped = stamp
        return stamp

    @staticmethod
    def _from_kept(user_id: str, kept: Union[int, _Kept]) -> Appointment:
        """An appointment from what is kept of it."""
        return Appointment(user_id, _START_AT[kept >> _STAMP_BITS]) if type(kept) is int \
            else kept.appointment

    def _on(self, user_id: str, held, date: dt.date) -> Optional[Appointment]:
        """The appointment on date among what a user holds, if any."""
        kept = held.get(date) if isinstance(held, _Dates) else held
        found = None if kept is None else self._from_kept(user_id, kept)
        return found if found is not None and found.start.date() == date else None

    def _changed(self, held: _Dates) -> None:
        held.version = next(self._versions)

    def book(self, appointment: Appointment, keyed: Optional[Keyed] = None) -> Appointment:
        return self._once_per_key(keyed, lambda: self._book(appointment))

    def _book(self, appointment: Appointment) -> Appointment:
        """book(), under the lock: check and insert under one hold of it."""
        user_id, date = appointment.user_id, appointment.date
        held = self._by_user.get(user_id)
        existing = self._on(user_id, held, date)
        if existing is not None:
            raise AlreadyBooked(existing)
        if (len(held) if isinstance(held, _Dates) else int(held is not None)) \
                >= self.user_capacity:
            raise StoreFull(self.user_capacity, user_id)
        if self.capacity is not None and self._count >= self.capacity:
            raise StoreFull(self.capacity)
        start, stamp = appointment.start, self._stamp()
        birth = (start.toordinal() * 1440 + start.hour * 60 + start.minute) << _STAMP_BITS | stamp
        kept = birth if appointment[2:] == _NO_DETAILS else _Kept(appointment, birth, 0, stamp)
        if held is None:
            self._by_user[user_id] = kept
        else:
            if not isinstance(held, _Dates):  # a second appointment
                held = self._by_user[user_id] = _Dates(
                    {self._from_kept(user_id, held).date: held})
            held[date] = kept
            self._changed(held)
        self._count += 1
        return appointment

    def get(self, user_id: str, date: dt.date) -> Appointment:
        with self._lock:
            found = self._on(user_id, self._by_user.get(user_id), date)
        if found is None:
            raise NotBooked(user_id, date)
        return found

    def cancel(self, user_id: str, date: dt.date, condition: Condition = None,
               keyed: Optional[Keyed] = None) -> None:
        self._once_per_key(keyed, lambda: self._cancel(user_id, date, condition))

    def _cancel(self, user_id: str, date: dt.date, condition: Condition) -> None:
        """cancel(), under the lock."""
        held = self._by_user.get(user_id)
        current = self._on(user_id, held, date)
        if current is None:
            raise NotBooked(user_id, date)
        if condition is not None and not condition(current):
            raise ConditionFailed(current)
        self._count -= 1
        if not isinstance(held, _Dates):
            del self._by_user[user_id]
        else:
            del held[date]
            self._changed(held)
            if len(held) == 1:  # one left: compact again
                self._by_user[user_id] = next(iter(held.values()))

    def reschedule(self, user_id: str, date: dt.date, changes: Changes,
                   condition: Condition = None, keyed: Optional[Keyed] = None) -> Appointment:
        return self._once_per_key(keyed, lambda: self._reschedule(user_id, date, changes,
                                                                   condition))

    def _reschedule(self, user_id: str, date: dt.date, changes: Changes,
                    condition: Condition) -> Appointment:
        """reschedule(), under the lock: check and change under one hold of it."""
        held = self._by_user.get(user_id)
        kept = held.get(date) if isinstance(held, _Dates) else held
        found = None if kept is None else self._from_kept(user_id, kept)
        if found is None or found.start.date() != date:
            raise NotBooked(user_id, date)
        changed = changes.applied(found)
        existing = None if changed.date == date else self._on(user_id, held, changed.date)
        if existing is not None:
            raise AlreadyBooked(existing)
        if condition is not None and not condition(found):
            raise ConditionFailed(found)
        if changed == found:  # no change: the event stays as it was
            return changed
        birth, sequence = (kept, 0) if type(kept) is int else (kept.birth, kept.sequence)
        kept = _Kept(changed, birth, sequence + 1, self._stamp())
        if not isinstance(held, _Dates):
            self._by_user[user_id] = kept
        else:
            del held[date]
            held[changed.date] = kept
            self._changed(held)
        return changed

    def list_for_user(self, user_id: str, first: Optional[dt.date] = None,
                      last: Optional[dt.date] = None) -> List[Appointment]:
        with self._lock:
            held = self._by_user.get(user_id)
            kept = list(held.values()) if isinstance(held, _Dates) else () if held is None \
                else (held,)
        ordered = len(kept) < 2
        if not ordered:
            try:
                kept.sort()  # ints sort by start, faster than appointments do
                ordered = True
            except TypeError:  # a _Kept among them: the appointments are sorted below
                pass
        found = [Appointment(user_id, _START_AT[one >> _STAMP_BITS]) if type(one) is int
                 else one.appointment for one in kept]
        if first is not None or last is not None:
            found = [appointment for appointment in found
                     if (first is None or appointment.start.date() >= first)
                     and (last is None or appointment.start.date() <= last)]
        return found if ordered else sorted(found)  # by start: one a date

    def events(self, user_id: str) -> List[Event]:
        with self._lock:
            held = self._by_user.get(user_id)
            kept = list(held.values()) if isinstance(held, _Dates) else () if held is None \
                else (held,)
        found = [Event(Appointment(user_id, _START_AT[one >> _STAMP_BITS]), _birth_key(one), 0,
                       stamp_time(one & _STAMPS)) if type(one) is int
                 else Event(one.appointment, _birth_key(one.birth), one.sequence,
                            stamp_time(one.modified)) for one in kept]
        return sorted(found)  # by appointment: by start, one a date

    def version(self, user_id: str) -> object:
        """The version of the user's _Dates; else what is kept of the one appointment
        (immutable, and equal only to the same appointment as the same event, as it
        changes), or None for none."""
        with self._lock:
            held = self._by_user.get(user_id)
            return held.version if isinstance(held, _Dates) else held

    def count(self) -> int:
        with self._lock:
            return self._count

    def count_keys(self) -> int:
        with self._lock:
            return self._keys.held(None)


# Stores that keep appointments in an SQL database's tables (SQLiteStore, and one on
# PostgreSQL) share SQLStore: the SQL of every read and write, in the part of the two
# dialects that both databases read alike, and the rules around it.

# The columns of an appointment's row: its fields, then its details.
COLUMNS = ("user_id", "date", "time") + _DETAIL_NAMES
# What a booking writes of its event: its key (event_key()) and the stamp it was booked
# at, when it last changed; its sequence starts at 0 by itself.
_EVENT_MADE = ("event_key", "modified")


def stored_row_problem(user_id, date, time, *details) -> Optional[str]:
    """Why a stored appointment breaks today's rules (the parsers' own words), or
    None. Details (in the order of DETAILS) may be None: none."""
    for (name, parse), value in zip(_PARSERS, (user_id, date, time, *details)):
        if value is None and name in _DETAIL_NAMES:
            continue
        if not isinstance(value, str):
            return f"{name} is stored as {type(value).__name__}, not text"
        try:
            parsed = parse(value)
            if name == "user_id" and parsed != value:  # written past this release
                raise ValueError("is not in NFC (Unicode's composed form), as this release "
                                 "stores it")
            if name in _DETAIL_NAMES and parsed != value:  # as "a\r\nb", or ""
                raise ValueError("is not as this release stores it")
        except ValueError as error:
            return f"{name} {error}"
    return None


def past_the_bounds() -> Tuple[str, tuple]:
    """An SQL condition on a row of appointments, and its parameters, that holds
    wherever the row is past a bound of today's rules: a length (the user ID's, a
    detail's), the dates that can be booked, the minutes appointments start at.
    The tables' CHECK constraints hold only what no rule's value decides (the
    formats: a real YYYY-MM-DD date, an HH:MM time of day, text that is not empty,
    since SQLite's schema step 6 and PostgreSQL's step 2), so that a rule changed
    here needs no new step; the stores look for the rest with this, and
    stored_row_problem() says why a row found breaks the rules (a row past the
    user ID's length in another form than NFC may keep them)."""
    minutes = tuple(f"{minute:02d}" for minute in START_MINUTES)
    condition = " OR ".join(
        ["length(user_id) > ?", "date < ?", "date > ?",
         f"substr(time, 4) NOT IN ({', '.join('?' * len(minutes))})"]
        + [f"length({detail.name}) > ?" for detail in DETAILS])
    return condition, (MAX_USER_ID_LENGTH, FIRST_DATE.isoformat(), LAST_DATE.isoformat(),
                       *minutes, *(detail.text.max_length for detail in DETAILS))


@functools.lru_cache(maxsize=4096)
def _stored_start(date: str, time: str) -> dt.datetime:
    """The start of a stored appointment, read by today's rules (ValueError if it
    breaks them). Cached: it is read for every row of every listing, and looking it
    up is cheaper than even datetime.fromisoformat() alone."""
    return dt.datetime.combine(parse_date(date), parse_time(time), tzinfo=dt.timezone.utc)


class SQLDatabase(abc.ABC):
    """A connection to a database, as SQLStore runs its SQL: execute() and rowcount,
    no more, so that an sqlite3 connection (_SQLiteDatabase) and a PostgreSQL one
    each take this form in a few lines.

    The SQL is in the part of the dialects that SQLite from 3.31 (the oldest a
    Python 3.9 ships with) and PostgreSQL 15 read alike:
    - A ? for each parameter, never a value in the text: a PostgreSQL connection
      numbers them $1, $2... Each stands beside a column or a number, so that
      PostgreSQL infers its type where it is sent untyped (0 in Parse); text,
      int8, float8 and bytea do as well where it is typed.
    - Parameters and values: str (text), int (integer), float (SQLite's REAL,
      double precision), None (NULL), bytes (BLOB, bytea). No boolean parameter:
      a boolean column is written with the literal true or false (1 or 0 in
      SQLite, 3.23 and later) and read as NOT column.
    - No statement is made to fail, even for a moment: PostgreSQL aborts the whole
      transaction at the first that does, where SQLite fails that statement alone.
      A conflict is looked for first or passed over (INSERT ... ON CONFLICT DO
      NOTHING, SQLite 3.24 and later), and rows are addressed by their unique
      columns, never by SQLite's rowid.
    - No RETURNING (SQLite 3.35), no JSON functions: JSON is read and written in
      Python.
    """

    rowcount: int = -1  # how many rows the last statement inserted, updated or deleted

    @abc.abstractmethod
    def execute(self, sql: str, parameters: tuple = ()) -> list:
        """Run one statement, set rowcount, and return the rows it returned, each a
        tuple (an empty list for a statement that returns none). The database's
        failures are raised as its own errors, for the store's transact() or
        reading() to answer."""


class _SQLKeys(KeyTable):
    """The idempotency_keys table, through a database in the write's transaction:
    user_id and key (the primary key), fingerprint (bytes), kept (time.time()),
    changed (boolean), status, media_type, headers (JSON text) and body (bytes)."""

    # changed is written as a literal, and read as NOT changed: the form SQLite's
    # partial index of unchanged keys is used for (changed = 0 is not).
    _KEEP = ("INSERT INTO idempotency_keys (user_id, key, fingerprint, kept, changed, status, "
             "media_type, headers, body) VALUES (?, ?, ?, ?, {}, ?, ?, ?, ?)")
    _KEEP_CHANGED, _KEEP_UNCHANGED = _KEEP.format("true"), _KEEP.format("false")

    def __init__(self, db: SQLDatabase):
        self.db = db

    def forget_expired(self, before: float) -> None:
        self.db.execute("DELETE FROM idempotency_keys WHERE kept < ?", (before,))

    def find(self, user_id: str, key: str) -> Optional[Replay]:
        rows = self.db.execute("SELECT fingerprint, status, media_type, headers, body FROM "
                               "idempotency_keys WHERE user_id = ? AND key = ?", (user_id, key))
        if not rows:
            return None
        fingerprint, status, media_type, headers, body = rows[0]
        return Replay(bytes(fingerprint), status, media_type,
                      tuple(tuple(header) for header in json.loads(headers)),
                      None if body is None else bytes(body))

    def held(self, user_id: Optional[str]) -> int:
        if user_id is None:
            return self.db.execute("SELECT count(*) FROM idempotency_keys")[0][0]
        return self.db.execute("SELECT count(*) FROM idempotency_keys WHERE user_id = ?",
                               (user_id,))[0][0]

    def forget_unchanged(self, user_id: Optional[str]) -> bool:
        if user_id is None:
            self.db.execute("DELETE FROM idempotency_keys WHERE (user_id, key) = (SELECT "
                            "user_id, key FROM idempotency_keys WHERE NOT changed "
                            "ORDER BY kept LIMIT 1)")
        else:
            self.db.execute("DELETE FROM idempotency_keys WHERE user_id = ? AND key = (SELECT "
                            "key FROM idempotency_keys WHERE user_id = ? AND NOT changed "
                            "ORDER BY kept LIMIT 1)", (user_id, user_id))
        return self.db.rowcount > 0

    def oldest(self, user_id: Optional[str]) -> float:
        if user_id is None:
            return self.db.execute("SELECT min(kept) FROM idempotency_keys")[0][0]
        return self.db.execute("SELECT min(kept) FROM idempotency_keys WHERE user_id = ?",
                               (user_id,))[0][0]

    def keep(self, user_id: str, key: str, changed: bool, replay: Replay) -> None:
        self.db.execute(self._KEEP_CHANGED if changed else self._KEEP_UNCHANGED,
                        (user_id, key, replay.fingerprint, time.time(),
                         int(replay.status),  # not an HTTPStatus: int, as SQLDatabase takes
                         replay.media_type, json.dumps(replay.headers), replay.body))


def room(place: str, user_id: str) -> str:
    """An SQL condition that holds while the store (its capacity, unless that is
    negative) and the user (user_capacity) hold fewer appointments than they may,
    for one of user_id (SQL) at place (SQL: its place among those booked at once,
    1, 2..., which counts those before it against the capacity). Its parameters:
    the capacity, whatever place takes, the capacity again, whatever user_id
    takes, then user_capacity. The counts are the triggers' (SQLStore)."""
    return (f"(? < 0 OR (SELECT sum(n) FROM appointment_count) + {place} <= ?) "
            f"AND coalesce((SELECT appointments FROM users WHERE user_id = {user_id}), 0) < ?")


def insertion(rows: int) -> str:
    """SQL that books rows appointments at once, each made only while there is room
    for it (room()) and the user holds nothing that date. Its parameters: each
    appointment's COLUMNS, its event's key and stamp (_EVENT_MADE), and its place
    among them (1, 2...); then the capacity twice, and user_capacity. Each user is
    checked as the statement began, so a statement books at most one appointment
    of a user. Its SELECT has a WHERE, as SQLite needs to read ON CONFLICT as the
    upsert's (SQLite's documentation of UPSERT, "Parsing Ambiguity"); a VALUES
    list's columns are column1, column2... in SQLite and PostgreSQL alike."""
    columns = COLUMNS + _EVENT_MADE
    row = f"({', '.join('?' * (len(columns) - 1))}, CAST(? AS BIGINT), CAST(? AS INTEGER))"
    return (f"INSERT INTO appointments ({', '.join(columns)}) SELECT "
            + ", ".join(f"v.column{n}" for n in range(1, len(columns) + 1))
            + f" FROM (VALUES {', '.join([row] * rows)}) AS v WHERE "
            + room(f"v.column{len(columns) + 1}", "v.column1")
            + " ON CONFLICT (user_id, date) DO NOTHING")


class SQLStore(Store):
    """Appointments in the tables of an SQL database: the SQL of every read and
    write, run through an SQLDatabase, and the rules around it, for SQLiteStore
    and a store on PostgreSQL alike. The UNIQUE constraint, not this process,
    enforces one appointment per user and date, and the database's triggers keep
    the counts that the capacities are checked against, so that both hold across
    processes.

    The tables, as a subclass's schema makes them:
        appointments       COLUMNS, all text: date as YYYY-MM-DD and time as HH:MM
                           (UTC), a detail NULL when there is none; UNIQUE (user_id,
                           date); CHECK constraints that hold a row to its form (the
                           bounds that the rules' values set are the code's:
                           past_the_bounds()). Then its Event's: event_key (NULL:
                           the start's, for a row booked before events were kept,
                           or by an older release), sequence, and modified, a stamp
                           (NULL: not known)
        users              user_id (its primary key); appointments, how many the
                           user holds, and version, counted up at each change of
                           them, both kept by triggers on appointments
        appointment_count  n, kept by triggers: the sum of its rows is how many
                           appointments there are (SQLite's has one row)
        idempotency_keys   the keys kept (_SQLKeys)
        set_aside          COLUMNS and reason (text): rows that break today's
                           rules, moved out of the way as they were stored

    A row that breaks the rules (written past the constraints, by an older
    release, or past a bound of rules changed since) is left out of what is
    shown, and set aside by the first write it is in the way of (_held()).

    A subclass provides the database: transact() and reading(), below; it may
    override check() (calling this one), close(), and _insert(), how a booking
    writes its row where there is room for it.
    """

    @abc.abstractmethod
    def transact(self, apply: Callable, *args):
        """Run apply(db, *args) in a transaction, db an SQLDatabase, and return its
        result once the transaction is committed. An outcome that apply raises
        (_OUTCOMES, AlreadyKeyed) is its answer: what apply wrote before raising it
        (a key kept, a row set aside) is committed, then the outcome raised. Any
        other exception undoes what apply wrote, and is raised; the database's own
        failures as StoreUnavailable.

        apply reads, decides in Python, then writes: what it read must not change
        before it commits. SQLite runs one write transaction at a time. Where
        transactions run at once (PostgreSQL), run them at REPEATABLE READ or
        SERIALIZABLE: a transaction that another overtook fails (SQLSTATE 40001;
        23505 where both inserted one key or appointment), and transact() runs apply
        again in a new transaction. At READ COMMITTED, two writes could both pass
        one capacity or If-Match check."""

    @abc.abstractmethod
    def reading(self) -> ContextManager[SQLDatabase]:
        """A context manager: an SQLDatabase for reads by this thread alone, each
        statement seeing what was committed; the database's failures within it
        raised as StoreUnavailable."""

    # The details' columns, in queries: ", note".
    _DETAILS = "".join(f", {name}" for name in _DETAIL_NAMES)

    @staticmethod
    def _from_row(user_id: str, date: str, time: str, *details) -> Optional[Appointment]:
        """A stored row as an Appointment, or None if it breaks the rules (the CHECK
        constraints keep out rows of the wrong form, not those past a bound of the
        rules, nor any written with them switched off): such a row is left out of
        what is shown, and set aside by the first write it is in the way of
        (_held()). Its user ID is the one asked for, which a request's parser took."""
        try:
            start = _stored_start(date, time)
        except ValueError:
            return None
        if details != _NO_DETAILS and stored_row_problem(
                user_id, date, time, *details):  # details are rare: checked as they come
            return None
        return Appointment(user_id, start, *details)

    _HELD = f"SELECT time{_DETAILS} FROM appointments WHERE user_id = ? AND date = ?"
    _SET_ASIDE = (f"INSERT INTO set_aside ({', '.join(COLUMNS)}, reason) SELECT "
                  f"{', '.join(COLUMNS)}, ? FROM appointments WHERE user_id = ? AND date = ?")

    def _held(self, db: SQLDatabase, user_id: str, date: str) -> Optional[Appointment]:
        """In a write's transaction: the user's appointment on date, if any. A row
        there that breaks the rules is set aside, and is not in the way."""
        rows = db.execute(self._HELD, (user_id, date))
        if not rows:
            return None
        held = self._from_row(user_id, date, *rows[0])
        if held is None:
            db.execute(self._SET_ASIDE, (stored_row_problem(user_id, date, *rows[0]),
                                         user_id, date))
            db.execute("DELETE FROM appointments WHERE user_id = ? AND date = ?",
                       (user_id, date))
        return held

    _INSERT = insertion(1)

    def _row(self, appointment: Appointment) -> tuple:
        """What a booking writes of appointment: its COLUMNS, then its event's key
        and stamp (_EVENT_MADE), stamped now."""
        stamp = self.clock() // 1000
        date, time_of_day = _start_strings(appointment.start)[:2]  # cached, as the reply finds it
        return (appointment.user_id, date, time_of_day, *appointment.details,
                event_key(appointment.start, stamp), stamp)

    @property
    def _limit(self) -> int:
        """The capacity as room() and StoreFull take it: negative for none."""
        return -1 if self.capacity is None else self.capacity

    def _insertion_parameters(self, appointments: Sequence[Appointment]) -> list:
        """The parameters of insertion(len(appointments))."""
        parameters: list = []
        for place, appointment in enumerate(appointments, 1):
            parameters += (*self._row(appointment), place)
        return parameters + [self._limit, self._limit, self.user_capacity]

    def _insert(self, db: SQLDatabase, appointment: Appointment) -> int:
        """Run _INSERT for appointment: how many rows it inserted (0 or 1)."""
        db.execute(self._INSERT, tuple(self._insertion_parameters((appointment,))))
        return db.rowcount

    def _book(self, db: SQLDatabase, appointment: Appointment) -> Appointment:
        """book(), in the write's transaction."""
        if self._insert(db, appointment):
            return appointment
        user_id, date = appointment.user_id, appointment.date.isoformat()
        existing = self._held(db, user_id, date)  # a conflict is a 409 even when full
        if existing is not None:
            raise AlreadyBooked(existing)
        if self._insert(db, appointment):  # a row in the way was set aside, or it is full
            return appointment
        held = db.execute("SELECT appointments FROM users WHERE user_id = ?", (user_id,))
        if held and held[0][0] >= self.user_capacity:
            raise StoreFull(self.user_capacity, user_id)
        raise StoreFull(self._limit)

    def _cancel(self, db: SQLDatabase, user_id: str, date: dt.date,
                condition: Condition) -> None:
        """cancel(), in the write's transaction."""
        held = self._held(db, user_id, date.isoformat())
        if held is None:  # as a lookup would say
            raise NotBooked(user_id, date)
        if condition is not None and not condition(held):
            raise ConditionFailed(held)
        db.execute("DELETE FROM appointments WHERE user_id = ? AND date = ?",
                   (user_id, date.isoformat()))

    # A row booked before events were kept takes its key from the start it moves from.
    _UPDATE = (f"UPDATE appointments SET date = ?, time = ?"
               f"{''.join(f', {name} = ?' for name in _DETAIL_NAMES)}, "
               "event_key = coalesce(event_key, ?), sequence = sequence + 1, modified = ? "
               "WHERE user_id = ? AND date = ?")

    def _reschedule(self, db: SQLDatabase, user_id: str, date: dt.date,
                    changes: Changes, condition: Condition) -> Appointment:
        """reschedule(), in the write's transaction: one UPDATE, so the row moves
        whole or not at all, once nothing is in its way."""
        held = self._held(db, user_id, date.isoformat())
        if held is None:
            raise NotBooked(user_id, date)
        moved = changes.applied(held)
        if moved.date != date:  # looked for first: the UPDATE must not fail on it
            existing = self._held(db, user_id, moved.date.isoformat())
            if existing is not None:
                raise AlreadyBooked(existing)
        if condition is not None and not condition(held):  # after a conflict, as in memory
            raise ConditionFailed(held)
        if moved == held:  # no change: the event stays as it was
            return moved
        db.execute(self._UPDATE, (*_start_strings(moved.start)[:2],
                                  *moved.details, event_key(held.start), self.clock() // 1000,
                                  user_id, date.isoformat()))
        return moved

    # The health check's booking, by a user no member can be (the parser refuses an
    # invisible character; the CHECK constraints do not look for one).
    PROBE = ("\u200bhealth-check", "2000-01-01", "00:00")

    def _probe(self, db: SQLDatabase) -> None:
        """Book and cancel in one transaction: what a booking writes, written."""
        db.execute("INSERT INTO appointments (user_id, date, time) VALUES (?, ?, ?)", self.PROBE)
        db.execute("DELETE FROM appointments WHERE user_id = ? AND date = ?", self.PROBE[:2])

    def _once_per_key(self, db: SQLDatabase, keyed: Optional[Keyed], apply: Callable, *args):
        """apply(db, *args), once per key (_once()): the key's response is read and
        written in the write's own transaction, so a retry after a crash, or in
        another process, finds it or finds nothing done."""
        if keyed is None:  # no key: none of _once()'s work
            return apply(db, *args)
        return _once(keyed, _SQLKeys(db), (self.max_keys_per_user, self.max_keys),
                     lambda: apply(db, *args))

    def book(self, appointment: Appointment, keyed: Optional[Keyed] = None) -> Appointment:
        return self.transact(self._once_per_key, keyed, self._book, appointment)

    def reschedule(self, user_id: str, date: dt.date, changes: Changes,
                   condition: Condition = None, keyed: Optional[Keyed] = None) -> Appointment:
        return self.transact(self._once_per_key, keyed, self._reschedule, user_id, date, changes,
                          condition)

    def cancel(self, user_id: str, date: dt.date, condition: Condition = None,
               keyed: Optional[Keyed] = None) -> None:
        self.transact(self._once_per_key, keyed, self._cancel, user_id, date, condition)

    def get(self, user_id: str, date: dt.date) -> Appointment:
        with self.reading() as db:
            rows = db.execute(self._HELD, (user_id, date.isoformat()))
        found = self._from_row(user_id, date.isoformat(), *rows[0]) if rows else None
        if found is None:
            raise NotBooked(user_id, date)
        return found

    _LIST = (f"SELECT date, time{_DETAILS} FROM appointments WHERE user_id = ? "
             "AND date BETWEEN ? AND ? ORDER BY date")

    def list_for_user(self, user_id: str, first: Optional[dt.date] = None,
                      last: Optional[dt.date] = None) -> List[Appointment]:
        bounds = (first or FIRST_DATE).isoformat(), (last or LAST_DATE).isoformat()
        with self.reading() as db:
            rows = db.execute(self._LIST, (user_id, *bounds))
        return [found for found in (self._from_row(user_id, *row) for row in rows)
                if found is not None]

    _EVENTS = (f"SELECT date, time{_DETAILS}, event_key, sequence, modified "
               "FROM appointments WHERE user_id = ? ORDER BY date")
    # A key as event_key() makes it, in printable ASCII with no space, as a feed's UID
    # may hold it; another (written past the store by hand) is taken as none.
    _KEY_FORM = re.compile(r"[!-~]+")

    def events(self, user_id: str) -> List[Event]:
        with self.reading() as db:
            rows = db.execute(self._EVENTS, (user_id,))
        events = []
        for *row, key, sequence, modified in rows:
            found = self._from_row(user_id, *row)
            if found is not None:
                if not (isinstance(key, str) and self._KEY_FORM.fullmatch(key)):
                    key = event_key(found.start)
                events.append(Event(found, key, sequence,
                                    None if modified is None else stamp_time(modified)))
        return events

    def version(self, user_id: str) -> object:
        """The user's version, which the triggers count up at every change; None for
        a user who never held an appointment."""
        with self.reading() as db:
            found = db.execute("SELECT version FROM users WHERE user_id = ?", (user_id,))
        return found[0][0] if found else None

    def count(self) -> int:
        with self.reading() as db:
            return db.execute("SELECT CAST(sum(n) AS INTEGER) FROM appointment_count")[0][0]

    def count_keys(self) -> int:
        with self.reading() as db:
            return _SQLKeys(db).held(None)

    def check(self) -> None:
        """A write committed as bookings are (_probe(), through transact()): whatever
        would fail a booking now fails it. Then, StoreFull if it holds its
        capacity."""
        self.transact(self._probe)
        super().check()


# Group commit (SQLiteStore.transact()): the writes that line up while a transaction is
# being written go into the next one together. A write, a batch, and the handover of
# the writers' lock that processes take turns at (_Turns) are each a small state
# machine, changed only through to().

class _StateMachine:
    """Something whose state changes only by to(), as NEXT allows: each state, and the
    states it may go to from there. Any other change raises RuntimeError: it is a
    bug, and must not pass unseen."""

    __slots__ = ("state",)
    NEXT: Dict[str, Tuple[str, ...]] = {}

    def to(self, state: str) -> None:
        if state not in self.NEXT[self.state]:
            raise RuntimeError(f"{type(self).__name__} cannot go from {self.state} to {state}")
        self.state = state


class _Write(_StateMachine):
    """One write (a booking, reschedule, cancellation, or the health check's probe)
    on its way through group commit: apply(db, *args), to be run in a batch's
    transaction; deadline, when it stops waiting for the writers' lock
    (time.monotonic()); and, once run, its outcome (result, or error to raise).

        state     what it is                                   next
        NEW       made, not yet in line                        WAITING, LEADING
        WAITING   in line behind another write; its thread     LEADING, BATCHED
                  sleeps
        LEADING   first in line: its thread leads the next     BATCHED
                  batch (SQLiteStore._lead())
        BATCHED   in the batch that its leader is writing      DONE
        DONE      answered and out of the line                 none

    """

    NEW, WAITING, LEADING, BATCHED, DONE = "new", "waiting", "leading", "batched", "done"
    NEXT = {NEW: (WAITING, LEADING), WAITING: (LEADING, BATCHED), LEADING: (BATCHED,),
            BATCHED: (DONE,), DONE: ()}

    __slots__ = ("apply", "args", "deadline", "result", "error", "_asleep")

    def __init__(self, apply: Callable, args: tuple, deadline: float):
        self.state = self.NEW
        self.apply, self.args, self.deadline = apply, args, deadline
        self.result, self.error = None, None
        self._asleep: Optional[threading.Lock] = None  # held from wait() until wake()

    def wait(self) -> None:
        """WAITING, from NEW (under the line lock): its thread is to sleep()."""
        self.to(self.WAITING)
        self._asleep = threading.Lock()
        self._asleep.acquire()

    def sleep(self) -> None:
        """Sleep until wake() (without the line lock, which the waker needs)."""
        self._asleep.acquire()

    def wake(self) -> None:
        """Wake its thread, once: as it leads, or else as it is DONE."""
        self._asleep.release()

    def outcome(self):
        """Once DONE: its result, or its error raised."""
        if self.state is not self.DONE:
            raise RuntimeError(f"a write's outcome was asked for while it is {self.state}")
        if self.error is not None:
            raise self.error
        return self.result


class _Batch(_StateMachine):
    """The writes that one leader writes in one transaction: every write in line
    once the leader has taken the writers' lock (or failed to), the leader first.

        state      what it is                                     next
        GATHERED   its writes taken from the line, BATCHED        WRITING, FAILED
        WRITING    in its transaction, holding the writers'       COMMITTED, FAILED
                   lock: each write has its own outcome (one
                   that fails unforeseen is undone alone)
        COMMITTED  on disk: each write's outcome stands           ANSWERED
        FAILED     nothing written: every write's outcome is      ANSWERED
                   one error (fail())
        ANSWERED   each write DONE, and the next write in line    none
                   LEADING
    """

    GATHERED, WRITING, COMMITTED, FAILED, ANSWERED = (
        "gathered", "writing", "committed", "failed", "answered")
    NEXT = {GATHERED: (WRITING, FAILED), WRITING: (COMMITTED, FAILED),
            COMMITTED: (ANSWERED,), FAILED: (ANSWERED,), ANSWERED: ()}

    __slots__ = ("writes",)

    def __init__(self, writes: List[_Write]):
        self.state, self.writes = self.GATHERED, writes

    def fail(self, error: Exception) -> None:
        """FAILED: error is every write's outcome."""
        self.to(self.FAILED)
        for write in self.writes:
            write.result, write.error = None, error


class _Turns(_StateMachine):
    """The writers' file lock ({database}-lock) that the processes sharing a database
    take turns at, with a deadline. flock() waits as long as it takes, so a thread
    of its own (the waiter) waits there when the lock is busy, on a descriptor of
    its own (two descriptors of one file exclude each other as two processes do),
    and hands the lock over if the writer still wants it. One writer at a time
    takes it (transact() leads one batch at a time). The handover's state, guarded by
    _changed:

        state    what it is                                       next
        IDLE     no writer wants the lock from the waiter,        WANTED, CLOSED
                 which sleeps
        WANTED   a writer waits for it (take()), and the waiter   HANDED, IDLE, CLOSED
                 for flock(); IDLE if the writer's timeout
                 passes first (the waiter then lets it go)
        HANDED   the waiter holds it for the writer, which        IDLE, CLOSED
                 takes it
        CLOSED   close() was called: the waiter ends              none
    """

    IDLE, WANTED, HANDED, CLOSED = "idle", "wanted", "handed", "closed"
    NEXT = {IDLE: (WANTED, CLOSED), WANTED: (HANDED, IDLE, CLOSED), HANDED: (IDLE, CLOSED),
            CLOSED: ()}

    def __init__(self, path: str):
        self.state = self.IDLE
        # Unbuffered binary files: flock() asks one for its descriptor directly, where a
        # text file passes the question on through its buffer.
        self._mine = open(path, "ab", buffering=0)  # taken at once when the lock is free
        self._theirs = open(path, "ab", buffering=0)  # the waiter's; it closes it
        self._held: Optional[BinaryIO] = None  # whichever holds the lock while taken
        self._changed = threading.Condition()  # guards state and _waiter
        self._waiter: Optional[threading.Thread] = None

    def take(self, timeout: float) -> bool:
        """Take the lock within timeout seconds; False if it stayed busy."""
        try:
            fcntl.flock(self._mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._held = self._mine
            return True
        except BlockingIOError:
            pass
        with self._changed:
            if self._waiter is None or not self._waiter.is_alive():  # first, or it failed
                waiter = threading.Thread(target=self._wait, name="writers-lock", daemon=True)
                waiter.start()
                self._waiter = waiter
            self.to(self.WANTED)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.state is not self.WANTED, timeout)
            handed = self.state is self.HANDED
            if self.state is not self.CLOSED:
                self.to(self.IDLE)  # taken, or no longer wanted
        if handed:
            self._held = self._theirs
        return handed

    def give_back(self) -> None:
        try:
            fcntl.flock(self._held, fcntl.LOCK_UN)
        except ValueError:  # close() closed its file, which let it go
            pass
        self._held = None

    def _wait(self) -> None:
        """The waiter: while the lock is WANTED, wait for it, then hand it over if it
        still is; until CLOSED."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self.state is self.WANTED
                                       or self.state is self.CLOSED)
                if self.state is self.CLOSED:
                    break
            fcntl.flock(self._theirs, fcntl.LOCK_EX)  # as long as it takes
            with self._changed:
                handing = self.state is self.WANTED
                if handing:
                    self.to(self.HANDED)
                    self._changed.notify_all()
            if not handing:
                fcntl.flock(self._theirs, fcntl.LOCK_UN)  # nobody wants it any more
        self._theirs.close()

    def close(self) -> None:
        with self._changed:
            if self.state is not self.CLOSED:  # it may be closed twice
                self.to(self.CLOSED)
                self._changed.notify_all()
            if self._waiter is None:
                self._theirs.close()
        self._mine.close()  # the waiter, if stuck in flock(), ends when the lock is free


# The SQLite file's schema, versioned: PRAGMA user_version holds its version and
# PRAGMA application_id says the file is this service's (the header fields SQLite
# has for just that). Step n brings a file from version n - 1 to n; a start runs
# every step a file lacks, in one transaction, and refuses a file it does not own.
# Version 0 is a file from before versions: empty, or as the releases of 2026-11-25
# (the appointments table alone) and 2026-11-30 (with a count and its triggers) made it.
#
# A step that shipped is frozen: literal SQL, never built from the rules' constants
# (START_MINUTES, FIRST_DATE...) nor edited, so that it does to a file today what it
# did when it shipped, and a file it made and a file it upgraded are alike. Since
# step 6 no constraint holds a rule's value, so a rule that changes needs no step;
# a change of the tables gets a new one. The tests hold a digest of each step's SQL.
APPLICATION_ID = 0x53434844  # "SCHD"
_UNVERSIONED = {("table", "appointments"), ("index", "sqlite_autoindex_appointments_1"),
                ("table", "appointment_count"), ("trigger", "counted"),
                ("trigger", "uncounted")}
# The appointments table as step 1 made it, the rules of that release written out in
# its CHECK constraints; step 6 leaves in SQL only what no rule's value decides
# (past_the_bounds()).
_APPOINTMENTS_TABLE = """
    CREATE TABLE appointments (
        user_id TEXT NOT NULL CHECK (typeof(user_id) = 'text'
            AND length(user_id) BETWEEN 1 AND 256 AND user_id = trim(user_id)
            AND user_id NOT GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')),
        date TEXT NOT NULL CHECK (typeof(date) = 'text'  -- YYYY-MM-DD, UTC, a real date
            AND date BETWEEN '2000-01-01' AND '2099-12-31' AND date(date, '+0 days') IS date),
        time TEXT NOT NULL CHECK (typeof(time) = 'text'  -- HH:MM, UTC
            AND time GLOB '[0-2][0-9]:[0-5][0-9]' AND time < '24:00'
            AND substr(time, 4) IN ('00', '30')),
        UNIQUE (user_id, date)
    )"""


class DatabaseRefused(sqlite3.DatabaseError):
    """A file the service will not open: another application's, or one written by a
    newer release. Raised before anything in it is changed."""


def _lenient_text(data: bytes) -> str:
    """Text as SQLite holds it, even when it is not UTF-8: undecodable bytes become
    lone surrogates, which the parsers refuse."""
    return data.decode("utf-8", "surrogateescape")


class _SQLiteDatabase(SQLDatabase):
    """An sqlite3 connection as SQLStore runs its SQL through it. A row with text
    that is not UTF-8 (written past the checks) is read again leniently, so that
    the rules refuse the row, rather than the read failing. This is done only
    then, since a text_factory written in Python would slow down every listing."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection, self.rowcount = connection, -1

    def execute(self, sql: str, parameters: tuple = ()) -> list:
        self.rowcount = -1  # until the statement has run: it may fail
        try:
            cursor = self.connection.execute(sql, parameters)
            rows = cursor.fetchall()
        except sqlite3.OperationalError as error:
            if not str(error).startswith("Could not decode to UTF-8"):
                raise
            self.connection.text_factory = _lenient_text
            try:
                cursor = self.connection.execute(sql, parameters)
                rows = cursor.fetchall()
            finally:
                self.connection.text_factory = str
        self.rowcount = cursor.rowcount
        return rows


def _set_aside(db: sqlite3.Connection, rowid: int, reason: str) -> None:
    """Move a row that breaks the rules to set_aside, as it was stored, by its rowid
    (SQLiteStore.sweep(): its user ID may not be text that can be asked for)."""
    db.execute(f"INSERT INTO set_aside ({', '.join(COLUMNS)}, reason) SELECT "
               f"{', '.join(COLUMNS)}, ? FROM appointments WHERE rowid = ?", (reason, rowid))
    db.execute("DELETE FROM appointments WHERE rowid = ?", (rowid,))


def _schema_1(db: sqlite3.Connection) -> None:
    """Rows checked by SQLite, one count row, and rows that break the rules set aside."""
    for statement in (
            # An empty file starts as the first release made it, and takes the same path.
            "CREATE TABLE IF NOT EXISTS appointments (user_id TEXT NOT NULL, "
            "date TEXT NOT NULL, time TEXT NOT NULL, UNIQUE (user_id, date))",
            "DROP TRIGGER IF EXISTS counted",
            "DROP TRIGGER IF EXISTS uncounted",
            # A row each start: INSERT ... SELECT COUNT(*) ... WHERE NOT EXISTS returned
            # one row even when WHERE was false (an aggregate without GROUP BY does).
            "DROP TABLE IF EXISTS appointment_count",
            "ALTER TABLE appointments RENAME TO unversioned",
            _APPOINTMENTS_TABLE,
            # Untyped columns: a row keeps what it held, a BLOB stays a BLOB.
            "CREATE TABLE set_aside (user_id, date, time, reason TEXT NOT NULL, "
            "since TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
            "INSERT OR IGNORE INTO appointments SELECT user_id, date, time FROM unversioned"):
        db.execute(statement)
    # What the CHECK constraints kept out; each row's reason in the parsers' words.
    refused = db.execute("SELECT rowid, user_id, date, time FROM unversioned AS old "
                         "WHERE NOT EXISTS (SELECT 1 FROM appointments AS new WHERE "
                         "new.user_id IS old.user_id AND new.date IS old.date "
                         "AND new.time IS old.time)").fetchall()
    for rowid, *row in refused:
        db.execute("INSERT INTO set_aside (user_id, date, time, reason) SELECT user_id, date, "
                   "time, ? FROM unversioned WHERE rowid = ?",
                   (stored_row_problem(*row) or "a second appointment of the user that date, "
                    "or another rule of the table", rowid))
        db.execute("DELETE FROM unversioned WHERE rowid = ?", (rowid,))
    for statement in (
            "DROP TABLE unversioned",
            "CREATE TABLE appointment_count (one INTEGER PRIMARY KEY CHECK (one = 1), "
            "n INTEGER NOT NULL)",
            "INSERT INTO appointment_count SELECT 1, COUNT(*) FROM appointments",
            "CREATE TRIGGER counted AFTER INSERT ON appointments "
            "BEGIN UPDATE appointment_count SET n = n + 1; END",
            "CREATE TRIGGER uncounted AFTER DELETE ON appointments "
            "BEGIN UPDATE appointment_count SET n = n - 1; END",
            "PRAGMA application_id = 1396918340"):  # APPLICATION_ID
        db.execute(statement)


def _schema_2(db: sqlite3.Connection) -> None:
    """A note for the practitioner."""
    db.execute("ALTER TABLE appointments ADD COLUMN note TEXT CHECK (note IS NULL OR ("
               "typeof(note) = 'text' AND length(note) BETWEEN 1 AND 500))")  # MAX_NOTE_LENGTH
    db.execute("ALTER TABLE set_aside ADD COLUMN note")


def _schema_3(db: sqlite3.Connection) -> None:
    """Idempotency keys: each keyed write's response, written with the write."""
    db.execute("CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL, "
               "kept REAL NOT NULL, status INTEGER NOT NULL, media_type TEXT, "
               "headers TEXT NOT NULL, body BLOB)")
    db.execute("CREATE INDEX idempotency_keys_by_age ON idempotency_keys (kept)")


def _schema_4(db: sqlite3.Connection) -> None:
    """User IDs in NFC: forms of one ID merge, a second appointment on a date set aside."""
    db.execute("CREATE TEMP TABLE in_nfc (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, "
               "date TEXT NOT NULL)")
    db.execute("CREATE INDEX temp.in_nfc_by_user ON in_nfc (user_id, date)")
    # The IDs beyond ASCII (ASCII is NFC) in NFC, computed here: SQLite has no NFC, and
    # a function of Python's is not called with text that is not UTF-8. NFC is stable
    # (Unicode's normalization stability policy), so this step does what it did.
    renamed = []
    for rowid, user_id, date in _SQLiteDatabase(db).execute(
            "SELECT rowid, user_id, date FROM appointments WHERE length(user_id) <> "
            "length(CAST(user_id AS BLOB))"):
        in_nfc = unicodedata.normalize("NFC", user_id)
        try:
            in_nfc.encode()
        except UnicodeEncodeError:  # not UTF-8 in the file: left for the sweep to set aside
            continue
        if in_nfc != user_id:
            renamed.append((rowid, in_nfc, date))
    db.executemany("INSERT INTO temp.in_nfc VALUES (?, ?, ?)", renamed)
    # Of one user's appointments on one date, the one stored in NFC is kept, or else
    # the first stored (the lowest rowid).
    for rowid, in db.execute(
            "SELECT id FROM temp.in_nfc AS renamed WHERE EXISTS (SELECT 1 FROM appointments "
            "WHERE user_id = renamed.user_id AND date = renamed.date) OR EXISTS (SELECT 1 "
            "FROM temp.in_nfc AS other WHERE other.user_id = renamed.user_id "
            "AND other.date = renamed.date AND other.id < renamed.id)").fetchall():
        db.execute("INSERT INTO set_aside (user_id, date, time, note, reason) SELECT user_id, "
                   "date, time, note, ? FROM appointments WHERE rowid = ?",
                   ("user_id is, in NFC (as this release reads it), the user of another "
                    "appointment that date", rowid))
        db.execute("DELETE FROM appointments WHERE rowid = ?", (rowid,))
        db.execute("DELETE FROM temp.in_nfc WHERE id = ?", (rowid,))
    db.execute("UPDATE appointments SET user_id = (SELECT user_id FROM temp.in_nfc "
               "WHERE id = appointments.rowid) WHERE rowid IN (SELECT id FROM temp.in_nfc)")
    db.execute("DROP TABLE temp.in_nfc")


def _schema_5(db: sqlite3.Connection) -> None:
    """Each user's count and version of appointments, kept by triggers; idempotency
    keys scoped to the user a request names."""
    for statement in (
            "CREATE TABLE users (user_id TEXT PRIMARY KEY, appointments INTEGER NOT NULL, "
            "version INTEGER NOT NULL) WITHOUT ROWID",
            "INSERT INTO users SELECT user_id, count(*), 1 FROM appointments GROUP BY user_id",
            "CREATE TRIGGER user_booked AFTER INSERT ON appointments BEGIN "
            "INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE SET "
            "appointments = appointments + 1, version = version + 1; END",
            "CREATE TRIGGER user_cancelled AFTER DELETE ON appointments BEGIN "
            "UPDATE users SET appointments = appointments - 1, version = version + 1 "
            "WHERE user_id = OLD.user_id; END",
            "CREATE TRIGGER user_changed AFTER UPDATE ON appointments BEGIN "
            "UPDATE users SET appointments = appointments - 1, version = version + 1 "
            "WHERE user_id = OLD.user_id; "
            "INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE SET "
            "appointments = appointments + 1, version = version + 1; END",
            "ALTER TABLE idempotency_keys RENAME TO unscoped_keys",
            "DROP INDEX idempotency_keys_by_age",
            "CREATE TABLE idempotency_keys (user_id TEXT NOT NULL, key TEXT NOT NULL, "
            "fingerprint BLOB NOT NULL, kept REAL NOT NULL, changed INTEGER NOT NULL, "
            "status INTEGER NOT NULL, media_type TEXT, headers TEXT NOT NULL, body BLOB, "
            "PRIMARY KEY (user_id, key))",
            "CREATE INDEX idempotency_keys_by_age ON idempotency_keys (kept)",
            "CREATE INDEX idempotency_keys_unchanged ON idempotency_keys (kept) "
            "WHERE NOT changed",
            # A key kept before moves to the user its response names (a booking, a move,
            # the appointment in the way); one whose response names none (a DELETE's)
            # is dropped: a retry finds nothing to cancel, and changes nothing.
            "INSERT INTO idempotency_keys SELECT user_id, key, fingerprint, kept, "
            "status < 300, status, media_type, headers, body FROM (SELECT CASE WHEN "
            "json_valid(CAST(body AS TEXT)) THEN coalesce(json_extract(CAST(body AS TEXT), "
            "'$.user_id'), json_extract(CAST(body AS TEXT), '$.appointment.user_id')) END "
            "AS user_id, * FROM unscoped_keys) WHERE typeof(user_id) = 'text'",
            "DROP TABLE unscoped_keys"):
        db.execute(statement)


def _schema_6(db: sqlite3.Connection) -> None:
    """Rows checked by SQLite for their form alone; lengths, dates and starts by the rules."""
    # SQLite cannot change a constraint in place: the table is made anew and every
    # row copied, as its documentation of ALTER TABLE says ("Making Other Kinds Of
    # Table Schema Changes"): in the start's transaction, the new table renamed once
    # the old one is dropped, its triggers (dropped with it) made again as they were.
    for statement in (
            """CREATE TABLE new_appointments (
        user_id TEXT NOT NULL CHECK (typeof(user_id) = 'text'
            AND length(user_id) >= 1 AND user_id = trim(user_id)
            AND user_id NOT GLOB ('*[' || char(1) || '-' || char(31) || char(127) || ']*')),
        date TEXT NOT NULL CHECK (typeof(date) = 'text'  -- YYYY-MM-DD, UTC, a real date
            AND date(date, '+0 days') IS date),
        time TEXT NOT NULL CHECK (typeof(time) = 'text'  -- HH:MM, UTC
            AND time GLOB '[0-2][0-9]:[0-5][0-9]' AND time < '24:00'),
        note TEXT CHECK (note IS NULL OR (typeof(note) = 'text' AND length(note) >= 1)),
        UNIQUE (user_id, date)
    )""",
            "INSERT INTO new_appointments (rowid, user_id, date, time, note) "
            "SELECT rowid, user_id, date, time, note FROM appointments",
            "DROP TABLE appointments",
            "ALTER TABLE new_appointments RENAME TO appointments",
            "CREATE TRIGGER counted AFTER INSERT ON appointments "
            "BEGIN UPDATE appointment_count SET n = n + 1; END",
            "CREATE TRIGGER uncounted AFTER DELETE ON appointments "
            "BEGIN UPDATE appointment_count SET n = n - 1; END",
            "CREATE TRIGGER user_booked AFTER INSERT ON appointments BEGIN "
            "INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE SET "
            "appointments = appointments + 1, version = version + 1; END",
            "CREATE TRIGGER user_cancelled AFTER DELETE ON appointments BEGIN "
            "UPDATE users SET appointments = appointments - 1, version = version + 1 "
            "WHERE user_id = OLD.user_id; END",
            "CREATE TRIGGER user_changed AFTER UPDATE ON appointments BEGIN "
            "UPDATE users SET appointments = appointments - 1, version = version + 1 "
            "WHERE user_id = OLD.user_id; "
            "INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE SET "
            "appointments = appointments + 1, version = version + 1; END"):
        db.execute(statement)


def _schema_7(db: sqlite3.Connection) -> None:
    """Calendar events: a key kept across moves, a count of changes, when the last was made."""
    # A row from before keeps no key (NULL): its start's is its key until it moves,
    # as the feed's UID was made of the start (event_key()). No row is written.
    for statement in (
            "ALTER TABLE appointments ADD COLUMN event_key TEXT CHECK (event_key IS NULL OR ("
            "typeof(event_key) = 'text' AND length(event_key) >= 1))",
            "ALTER TABLE appointments ADD COLUMN sequence INTEGER NOT NULL DEFAULT 0 "
            "CHECK (typeof(sequence) = 'integer' AND sequence >= 0)",
            "ALTER TABLE appointments ADD COLUMN modified INTEGER "
            "CHECK (modified IS NULL OR typeof(modified) = 'integer')"):
        db.execute(statement)


def _schema_8(db: sqlite3.Connection) -> None:
    """User IDs checked for control characters by a pattern written out, not made for each row."""
    # The same constraints, but that a user ID's pattern, '*[' || char(1) || '-' ||
    # char(31) || char(127) || ']*' since step 1, is written out with the characters
    # themselves (a constant, in any text encoding of the file, where SQLite called char()
    # and joined the pieces for each row it checked); the table made anew and its rows
    # copied, as step 6 did.
    for statement in (
            """CREATE TABLE new_appointments (
        user_id TEXT NOT NULL CHECK (typeof(user_id) = 'text'
            AND length(user_id) >= 1 AND user_id = trim(user_id)
            AND user_id NOT GLOB '*[\x01-\x1f\x7f]*'),
        date TEXT NOT NULL CHECK (typeof(date) = 'text'  -- YYYY-MM-DD, UTC, a real date
            AND date(date, '+0 days') IS date),
        time TEXT NOT NULL CHECK (typeof(time) = 'text'  -- HH:MM, UTC
            AND time GLOB '[0-2][0-9]:[0-5][0-9]' AND time < '24:00'),
        note TEXT CHECK (note IS NULL OR (typeof(note) = 'text' AND length(note) >= 1)),
        event_key TEXT CHECK (event_key IS NULL OR (
            typeof(event_key) = 'text' AND length(event_key) >= 1)),
        sequence INTEGER NOT NULL DEFAULT 0 CHECK (typeof(sequence) = 'integer' AND sequence >= 0),
        modified INTEGER CHECK (modified IS NULL OR typeof(modified) = 'integer'),
        UNIQUE (user_id, date)
    )""",
            "INSERT INTO new_appointments (rowid, user_id, date, time, note, event_key, sequence, "
            "modified) SELECT rowid, user_id, date, time, note, event_key, sequence, modified "
            "FROM appointments",
            "DROP TABLE appointments",
            "ALTER TABLE new_appointments RENAME TO appointments",
            "CREATE TRIGGER counted AFTER INSERT ON appointments "
            "BEGIN UPDATE appointment_count SET n = n + 1; END",
            "CREATE TRIGGER uncounted AFTER DELETE ON appointments "
            "BEGIN UPDATE appointment_count SET n = n - 1; END",
            "CREATE TRIGGER user_booked AFTER INSERT ON appointments BEGIN "
            "INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE SET "
            "appointments = appointments + 1, version = version + 1; END",
            "CREATE TRIGGER user_cancelled AFTER DELETE ON appointments BEGIN "
            "UPDATE users SET appointments = appointments - 1, version = version + 1 "
            "WHERE user_id = OLD.user_id; END",
            "CREATE TRIGGER user_changed AFTER UPDATE ON appointments BEGIN "
            "UPDATE users SET appointments = appointments - 1, version = version + 1 "
            "WHERE user_id = OLD.user_id; "
            "INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE SET "
            "appointments = appointments + 1, version = version + 1; END"):
        db.execute(statement)


# Step n is SCHEMA_STEPS[n - 1]; new ones go last.
SCHEMA_STEPS = (_schema_1, _schema_2, _schema_3, _schema_4, _schema_5, _schema_6, _schema_7,
                _schema_8)
SCHEMA_VERSION = len(SCHEMA_STEPS)


class SQLiteStore(SQLStore):
    """Appointments in an SQLite file: they survive restarts, and several server
    processes may share one file. Its SQL is SQLStore's; what is SQLite's is here.

    Opening a file checks that it is this service's (or empty) before changing
    anything, and brings its schema up to date (SCHEMA_STEPS); notices says what
    that did, for the log. CHECK constraints hold every row to its form, and each
    start moves the rows that break the rules (from older releases, or past a rule
    changed since: sweep()) to the set_aside table.

    Writes are committed in groups, as databases do (PostgreSQL's group commit,
    MySQL's binlog group commit): writes that arrive while a transaction is being
    committed wait, then go into the next one together, with one fsync for
    all of them (transact(); the states of a write, a
    batch and the writers' lock are _Write's, _Batch's and _Turns's). A lone write
    waits for nothing. Reads use a connection of their own, which WAL lets read
    while a transaction is written.

    SQLite's own failures (a lock held too long, a read-only file, a full disk)
    are StoreUnavailable, for every write of the transaction they ended; it is
    rolled back whole, so nothing is half-written. A damaged file is noted in
    damaged; from then on writes are refused and check() reports it. (A write that
    touched no damaged page would succeed, and be lost with the file when its
    operator restores a backup.)

    A file deleted or replaced while the store is open (the -wal file, say, by a
    careless clean-up) goes unnoticed by SQLite: it writes on into the file it
    holds open, which no other process can open, and a crash loses what it held.
    A -shm file deleted is worse: the next process to open the database (a worker
    started again) would make a new one, and the processes would no longer see
    each other's writes to the -wal file, each overwriting what the other
    committed; so a store does not open a database whose -shm file is missing
    while other processes have it open (_refuse_a_deleted_shm()). A batch, under
    the writers' lock, if LOOK_EVERY seconds have passed since the last one
    looked, and check() compare the files at the path (the database, its -wal and
    -shm) with those opened (device and inode); once one differs (a -shm file:
    once another has taken its place), writes are refused (lost says why) until
    the server is started again, and check() copies what was committed into the
    database file (not after a -shm file: the -wal file still holds it, for the
    restart to find).
    """

    def __init__(self, path: str, capacity: Optional[int] = None, busy_timeout: float = 5.0,
                 max_keys: int = MAX_KEYS, *, user_capacity: int = MAX_APPOINTMENTS_PER_USER,
                 max_keys_per_user: int = MAX_KEYS_PER_USER):
        """Open (creating if needed) the database; raises DatabaseRefused for a file
        that is not this service's, and sqlite3.Error if it cannot be opened or
        written. busy_timeout: how long a write may wait for the database (the
        writers' lock, then SQLite's) before StoreUnavailable."""
        self.path, self.capacity, self.busy_timeout = path, capacity, busy_timeout
        self.user_capacity = user_capacity
        self.max_keys, self.max_keys_per_user = max_keys, max_keys_per_user
        self._transactions = 0  # committed by transact(), each of one write or more
        self.damaged: Optional[str] = None  # SQLite's words, once they said the file is damaged
        self.lost: Optional[str] = None  # which file was deleted or replaced, once noticed
        self._rescue = ""  # what was done about it, for the log...
        self._rescued = False  # ...and whether what was committed is in the database file
        self._files: Tuple[Tuple[str, Optional[Tuple[int, int]]], ...] = ()  # (path, identity)
        self._looked = 0.0  # when a batch last looked at _files (time.monotonic())
        self._line: Deque[_Write] = collections.deque()  # writes in line, the batch's first
        self._line_lock = threading.Lock()  # guards _line and the state of each write in it
        self._read_lock = threading.Lock()  # guards _reader: one thread at a time
        # Processes sharing the file take turns at writing through this lock: a process
        # waiting for it wakes as soon as it is free, where SQLite's own busy handler
        # sleeps between tries, so a waiting writer would often sleep on past the
        # moment the lock was freed.
        self._turns: Optional[_Turns] = None  # opened with the database, below
        self._writer = self._reader = None
        self._write_db = self._read_db = None  # the two as SQLDatabases
        self._busy_ms = int(busy_timeout * 1000)  # the writer's busy timeout (_begin())
        self._refuse_a_deleted_shm(path, time.monotonic() + busy_timeout)  # before it is opened
        self.inspect(path)  # before anything is written
        try:
            # isolation_level=None: transactions only where BEGIN says so.
            self._writer, self._reader = (
                sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                check_same_thread=False) for _ in range(2))
            self._write_db, self._read_db = map(_SQLiteDatabase, (self._writer, self._reader))
            self._use_wal()
            for db in (self._writer, self._reader):
                db.execute("PRAGMA synchronous = FULL")  # a 201 means the booking is on disk
            self.notices = self._upgrade()
            self._turns = _Turns(f"{path}-lock")
            # The files as opened: the -wal is there while a connection is open.
            self._files = tuple((name, self._identity(name))
                                for name in (path, path + "-wal", path + "-shm"))
        except (sqlite3.Error, OSError) as error:
            self.close()
            if isinstance(error, OSError):
                raise sqlite3.OperationalError(f"cannot open {path}-lock: {error.strerror}")
            raise

    def _use_wal(self) -> None:
        """Switch the file to WAL, which lets reads go on while one writes. SQLite
        refuses the switch at once, without waiting as its busy handler would, while
        another process starting on the same new file holds a lock (13 of 80 starts
        of four at once failed so): it is tried again until the deadline."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                self._writer.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if str(error) not in self.BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)  # a start-up's wait, as SQLite's busy handler sleeps

    @staticmethod
    def inspect(path: str) -> int:
        """The schema version of the file at path (0: empty, missing, or from before
        versions), read without changing it; DatabaseRefused if it is not this
        service's, or newer than this code."""
        if not os.path.exists(path + "-wal") and (not os.path.exists(path)
                                                  or os.path.getsize(path) == 0):
            return 0
        # Read-only, in one read transaction: another process may be creating or
        # upgrading the file, and four reads of their own could see two states (an
        # upgraded schema, and the header from before). Reading a file in WAL mode makes
        # its -wal and -shm if they are not there: removed again if it is refused.
        made = [path + suffix for suffix in ("-wal", "-shm") if not os.path.exists(path + suffix)]
        uri = f"file:{urllib.parse.quote(path)}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
                db.execute("BEGIN")
                owner = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                objects = {(kind, name) for kind, name in db.execute(
                    "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%'")}
                columns = [row[1] for row in db.execute("PRAGMA table_info(appointments)")]
                db.execute("COMMIT")
            if owner == APPLICATION_ID:
                if version > SCHEMA_VERSION:
                    raise DatabaseRefused(
                        f"its schema is version {version}, newer than this release's "
                        f"{SCHEMA_VERSION}; run the release that wrote it (nothing was changed)")
                if version < 1:
                    raise DatabaseRefused(f"its schema version, {version}, is none that a "
                                          "release of this service wrote (nothing was changed)")
                return version
            if owner == 0 and version == 0 and (not objects or (
                    objects <= _UNVERSIONED and columns == ["user_id", "date", "time"])):
                return 0
            tables = ", ".join(sorted(name for kind, name in objects if kind == "table"))
            raise DatabaseRefused(
                "it is not this service's: " + (f"it holds tables this service did not make "
                                                f"({tables})" if tables else
                                                f"its header says it is another application's "
                                                f"(application_id {owner}, user_version "
                                                f"{version})")
                + "; give --db a new file or one this service made (nothing was changed)")
        except sqlite3.DatabaseError as error:
            for file in made:
                with contextlib.suppress(OSError):
                    os.remove(file)
            if isinstance(error, DatabaseRefused):
                raise
            raise DatabaseRefused(f"it cannot be read without changing it ({error}); nothing "
                                  "was changed") from None

    def _upgrade(self) -> Tuple[str, ...]:
        """Bring the file to SCHEMA_VERSION and set aside rows that break the rules,
        in one transaction; what was done, a sentence each, for the log."""
        db, notices = self._writer, []
        db.text_factory = _lenient_text  # a hand-made row may hold text that is not UTF-8
        try:
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]  # now, under the lock
            owner = db.execute("PRAGMA application_id").fetchone()[0]
            if owner not in (0, APPLICATION_ID) or (version and owner != APPLICATION_ID):
                raise DatabaseRefused("it became another application's while it was opened")
            new = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
            for step in range(version, SCHEMA_VERSION):
                # Step 1 sets aside what its CHECK constraints refuse; the later ones
                # run with the checks off, so that a row a tool wrote past them (a
                # column added with a CHECK has SQLite check every row) is carried
                # over as it is, as a file made today would hold it, for the sweep
                # and the reads to deal with, rather than stopping the start.
                db.execute(f"PRAGMA ignore_check_constraints = {int(step > 0)}")
                SCHEMA_STEPS[step](db)
                if not new:
                    notices.append(f"Upgraded {self.path} to schema version {step + 1}: "
                                   f"{SCHEMA_STEPS[step].__doc__}")
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if new:
                notices.append(f"Created {self.path} (schema version {SCHEMA_VERSION}).")
            self.sweep(db)
            db.execute("UPDATE appointment_count SET n = n")  # fails if it cannot be written
            db.execute("COMMIT")
            return tuple(notices + self.set_aside_notice(db))
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            raise
        finally:
            db.text_factory = str
            with contextlib.suppress(sqlite3.Error):  # the checks on again, for every write
                db.execute("PRAGMA ignore_check_constraints = 0")

    @staticmethod
    def sweep(db: sqlite3.Connection) -> None:
        """Set aside the rows that break a rule the CHECK constraints leave to this
        code: a user ID's invisible characters, or its form if not NFC (those with
        characters beyond ASCII are checked), a user ID that is a dot segment, and
        the bounds (past_the_bounds()), which a rule changed since the last start
        may have moved."""
        bounds, parameters = past_the_bounds()
        dots = ", ".join("?" * len(DOT_SEGMENTS))
        found = db.execute(f"SELECT rowid, {', '.join(COLUMNS)} FROM appointments WHERE "
                           f"length(user_id) <> length(CAST(user_id AS BLOB)) OR user_id IN "
                           f"({dots}) OR {bounds}", (*DOT_SEGMENTS, *parameters)).fetchall()
        for rowid, *row in found:
            problem = stored_row_problem(*row)
            if problem:
                _set_aside(db, rowid, problem)

    SET_ASIDE_NAMED = 10  # rows the log names, at most

    # Seconds between two batches' looks for files deleted or replaced. Not every
    # batch: each stat() lets go of the GIL in the middle of the transaction, and
    # the batch then waits for another thread to give it back.
    LOOK_EVERY = 0.01

    def set_aside_notice(self, db: sqlite3.Connection) -> List[str]:
        """What the log says while rows are set aside: the first few, and the commands
        that see, restore and delete them."""
        rows = db.execute("SELECT rowid, user_id, date, time, reason FROM set_aside "
                          "ORDER BY rowid LIMIT ?", (self.SET_ASIDE_NAMED,)).fetchall()
        total = db.execute("SELECT COUNT(*) FROM set_aside").fetchone()[0]
        if not total:
            return []
        named = "; ".join(f"row {rowid}: {ascii(user_id)} {ascii(date)} {ascii(time)} ({reason})"
                          for rowid, user_id, date, time, reason in rows)
        more = f"; and {total - len(rows)} more" if total > len(rows) else ""
        sql = f"sqlite3 {shlex.quote(self.path)}"
        restored = ", ".join("'09:30'" if column == "time" else column for column in COLUMNS)
        return [f"{total} stored appointment(s) break the rules of this release and are set "
                f"aside in {self.path}: not shown, counted, or in the way of a booking. "
                f"{named}{more}. To see them all: {sql} \"SELECT rowid, * FROM set_aside\". "
                f"To restore one, corrected (row 1 at 09:30, say): {sql} \"INSERT INTO "
                f"appointments ({', '.join(COLUMNS)}) SELECT {restored} FROM set_aside "
                f"WHERE rowid = 1; "
                f"DELETE FROM set_aside WHERE rowid = 1\". To delete them: {sql} \"DELETE FROM "
                f"set_aside\"."]

    # SQLite's messages for its result codes (sqlite3_errstr()), the same in every
    # version: Python 3.9 and 3.10 give no sqlite_errorname to tell them by.
    BUSY = ("database is locked", "database table is locked")  # SQLITE_BUSY, SQLITE_LOCKED
    DAMAGED = ("database disk image is malformed", "file is not a database")  # CORRUPT, NOTADB
    FULL = "database or disk is full"  # SQLITE_FULL

    def _unavailable(self, error: sqlite3.Error) -> StoreUnavailable:
        """SQLite's failure as the client is told it, noting a damaged file: a
        sentence, SQLite's own words (which may quote the schema) left for the log.
        Only a busy lock is worth retrying soon: the rest need the operator."""
        text = str(error)
        if text in self.BUSY:
            return StoreUnavailable("The database is busy: another process has held its "
                                    "write lock too long; retry shortly.")
        if text in self.DAMAGED:
            self.damaged = text
            return self._damaged()
        if text == self.FULL:
            return StoreUnavailable("The database cannot grow: its disk is full; its "
                                    "operator must free space.", retry_after=None, cause=text)
        return StoreUnavailable("The database failed; its operator must look into the "
                                "server's log.", retry_after=None, cause=text)

    @staticmethod
    def _identity(path: str) -> Optional[Tuple[int, int]]:
        """The device and inode of the file at path; None if there is none."""
        try:
            status = os.stat(path)
        except OSError:
            return None
        return status.st_dev, status.st_ino

    def _lost(self) -> StoreUnavailable:
        what = {"-wal": "its -wal file", "-shm": "its -shm file"}.get(self.lost[-4:],
                                                                       "the database file")
        return StoreUnavailable(
            f"The database cannot keep bookings safely: {what} was deleted or replaced "
            "while the server ran. Bookings are refused until its operator starts the server "
            "again (every process on the file).", retry_after=None,
            cause=f"{self.lost} is not the file opened at the start; {self._rescue}")

    def _lost_file(self) -> Optional[str]:
        """The first file opened at the start that is no longer at its path, if any:
        a -shm file only once another file has taken its place. Deleted, it is still
        the one every process that has the database open shares, and no process of
        this service can join them with a new one (_refuse_a_deleted_shm())."""
        for name, opened in self._files:
            if opened is None:  # it was not there at the start
                continue
            now = self._identity(name)
            if now != opened and not (now is None and name.endswith("-shm")):
                return name
        return None

    @classmethod
    def _refuse_a_deleted_shm(cls, path: str, deadline: float) -> None:
        """DatabaseRefused if the database's -shm file was deleted while other
        processes have it open: opening it would make a new one, and from then on
        this process and those would each overwrite what the other commits to the
        -wal file. SQLite itself leaves a -wal file without its -shm for a moment,
        as it opens a database and as the last connection closes it: the state must
        last until the deadline to be refused."""
        while os.path.exists(path + "-wal") and not os.path.exists(path + "-shm") \
                and cls._held_by_another_process(path):
            if time.monotonic() >= deadline:
                raise DatabaseRefused(
                    "its -shm file was deleted while other processes have it open; stop "
                    "every process on it, then start the server again (nothing was "
                    "changed)")
            time.sleep(0.01)  # as SQLite's busy handler sleeps

    @staticmethod
    def _held_by_another_process(path: str) -> bool:
        """Whether another process has the database open. Each connection to a
        database in WAL mode holds a read lock on the bytes of its file that SQLite's
        SHARED lock takes (510 of them, 2 after the first GiB: SQLite's os_unix.c),
        which a write lock then cannot take. (A lock of this process's own would not
        stop it, and closing the file here lets go of every lock the process holds
        on it: a server has no connection to the database yet when it opens it.)"""
        try:
            file = open(path, "r+b")
        except OSError:  # SQLite says what is wrong with it
            return False
        with file:
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000002)
            except OSError:
                return True
        return False

    def _notice_lost_files(self) -> None:
        """If a file opened at the start is no longer at its path, note it in lost and
        copy every committed transaction from the -wal file this process still holds
        into the database file, where a process opening the path sees it (a
        checkpoint, on the read connection: the writes' line is left as it is).
        From then on writes are refused: _write_batch checks lost under the write
        lock, which the checkpoint waits for, and a crash would lose a later one."""
        if self.lost is None:
            self.lost = self._lost_file()
        if self.lost is None or self._rescued:
            return
        if self.lost == self.path:
            self._rescue = ("a process opening the path cannot see what this one wrote; "
                            "put back the file it should use, then restart the server")
            return
        if self.lost.endswith("-shm"):  # this process's view of the -wal file may be stale
            self._rescue = ("the -wal file holds what was committed; restart every process "
                            "on the file")
            return
        try:
            with self._read_lock:
                busy = self._reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            self._rescued = not busy
            self._rescue = ("every transaction committed was copied into the database file; "
                            "restart the server to make a new -wal file" if not busy else
                            "the checkpoint that copies what was committed into the database "
                            "file found it busy (tried again at the next health check); "
                            "restart the server")
        except sqlite3.Error as error:
            self._rescue = (f"the checkpoint that copies what was committed into the database "
                            f"file failed ({error}); restart the server")

    def _damaged(self) -> StoreUnavailable:
        return StoreUnavailable("The database file is damaged; its operator must restore it "
                                "from a backup.", retry_after=None, cause=self.damaged)

    @contextlib.contextmanager
    def reading(self):
        """The read connection, for this thread alone; its failures as StoreUnavailable."""
        try:
            with self._read_lock:
                yield self._read_db
        except sqlite3.Error as error:
            raise self._unavailable(error) from None

    def transact(self, apply: Callable, *args):
        """Run apply(db, *args) in a transaction, with every other write in line when
        it starts, and return its result once that transaction is on disk (or raise
        its outcome: AlreadyBooked, StoreUnavailable...). A write that finds the line
        empty leads (_lead()); one that finds others in it waits, until a leader has
        answered it or it is first in line and leads the next batch (_Write)."""
        write = _Write(apply, args, time.monotonic() + self.busy_timeout)
        with self._line_lock:
            waiting = bool(self._line)
            if waiting:
                write.wait()
            else:
                write.to(_Write.LEADING)
            self._line.append(write)
        if waiting:
            write.sleep()  # until it is LEADING, or DONE
        if write.state is _Write.LEADING:
            self._lead(write)
        return write.outcome()

    def _lead(self, leader: _Write) -> None:
        """Lead one batch, in four steps: take the writers' lock, by leader's deadline
        (the batch's writes lined up after it, so none waits past its own); gather
        every write in line into the batch; write it in one transaction (or fail it
        if the lock was not taken) and give the lock back; answer each write, and
        hand the lead to the next write in line. Each step catches its own failures,
        so that every write of the batch is answered and the next leader woken:
        else every later write would wait for ever."""
        refusal = self._take_turn(leader.deadline)
        batch = self._gather()
        if refusal is None:
            self._write_batch(batch, leader.deadline)
            self._turns.give_back()
        else:
            batch.fail(refusal)
        self._answer(batch)

    def _take_turn(self, deadline: float) -> Optional[StoreUnavailable]:
        """Take the writers' lock by deadline: None once taken, else why not."""
        try:
            if self._turns.take(max(0.0, deadline - time.monotonic())):
                return None
            return StoreUnavailable(
                "The database is busy: another process has held its write lock for over "
                f"{self.busy_timeout:g} s; retry shortly.")
        except Exception as error:  # the store closed; no thread to wait with...
            return StoreUnavailable("The database cannot be written; its operator must look "
                                    "into the server's log.", retry_after=None,
                                    cause=repr(error))

    def _gather(self) -> _Batch:
        """Every write in line, the leader first, BATCHED into one batch: those that
        lined up while the leader waited for the lock go with it."""
        with self._line_lock:
            batch = _Batch(list(self._line))
            for write in batch.writes:
                write.to(_Write.BATCHED)
        return batch

    def _write_batch(self, batch: _Batch, deadline: float) -> None:
        """Write the batch in one transaction: COMMITTED, each write with its own
        outcome (one that failed has had its changes undone); or, if the transaction
        itself fails, FAILED, with StoreUnavailable for every write and nothing
        written. The writes run one after another; should one fail unforeseen (a bug,
        or SQLite's failure for that write alone), perhaps halfway, the transaction
        is rolled back and the batch run again, each write in a savepoint of its own,
        so that only that write's changes are undone. A savepoint for every write,
        every time, would cost two statements a write for what seldom happens."""
        db = self._writer
        batch.to(_Batch.WRITING)
        try:
            if self.damaged is not None:
                raise self._damaged()
            self._begin(deadline)
            # Looked for under the lock that a checkpoint waits for.
            if self.lost is None and time.monotonic() >= self._looked + self.LOOK_EVERY:
                self._looked = time.monotonic()
                self.lost = self._lost_file()
            if self.lost is not None:
                raise self._lost()
            if not all(map(self._run, batch.writes)):  # map(): no generator's frame a batch
                db.execute("ROLLBACK")
                self._begin(deadline)
                for write in batch.writes:
                    self._run_apart(write)
            db.execute("COMMIT")  # the one fsync for the batch (synchronous = FULL)
        except Exception as error:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            batch.fail(self._unavailable(error) if isinstance(error, sqlite3.Error) else error)
            return
        batch.to(_Batch.COMMITTED)
        self._transactions += 1

    def _begin(self, deadline: float) -> None:
        """BEGIN IMMEDIATE, which takes SQLite's write lock, waiting for it (SQLite's
        busy timeout) no later than deadline. The busy timeout is changed only when it
        must be: lowered when less time is left than it allows (as after a wait in
        line, or for the writers' lock), and raised again once a tenth of busy_timeout
        more is left. So a wait may end up to that much before the deadline, never
        after it, and a batch mostly sends BEGIN alone."""
        left = int(max(0.0, deadline - time.monotonic()) * 1000)  # in milliseconds
        if left < self._busy_ms or left > self._busy_ms + self.busy_timeout * 100:
            self._busy_ms = min(left, int(self.busy_timeout * 1000))
            self._writer.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        self._writer.execute("BEGIN IMMEDIATE")

    def _run(self, write: _Write) -> bool:
        """One write of a batch being written: its result, or the outcome it raised
        (what it wrote before, a row set aside, is kept); False if it failed
        unforeseen, which may have left some of its changes (_write_batch() then
        runs the batch again, with _run_apart())."""
        try:
            write.result, write.error = write.apply(self._write_db, *write.args), None
        except (*_OUTCOMES, AlreadyKeyed) as outcome:
            write.result, write.error = None, outcome
        except Exception as error:
            if isinstance(error, sqlite3.Error) and not self._writer.in_transaction:
                raise  # SQLite ended the transaction: every write of the batch fails
            return False
        return True

    def _run_apart(self, write: _Write) -> None:
        """_run(), in a savepoint: a write that fails unforeseen has its changes
        undone, and its failure as its outcome. SQLite's failure that ended the
        whole transaction is raised: every write of the batch fails."""
        db = self._writer
        db.execute("SAVEPOINT one_write")
        try:
            write.result, write.error = write.apply(self._write_db, *write.args), None
        except (*_OUTCOMES, AlreadyKeyed) as outcome:
            write.result, write.error = None, outcome
        except Exception as error:  # a bug, or SQLite's failure for this write alone
            if isinstance(error, sqlite3.Error) and not db.in_transaction:
                raise
            db.execute("ROLLBACK TO one_write")
            write.result = None
            write.error = self._unavailable(error) if isinstance(error, sqlite3.Error) else error
        db.execute("RELEASE one_write")

    def _answer(self, batch: _Batch) -> None:
        """Take the batch's writes out of the line, DONE, and wake their threads; the
        next write in line, if any, leads the next batch."""
        with self._line_lock:
            batch.to(_Batch.ANSWERED)
            for write in batch.writes:
                self._line.popleft()  # the batch's writes are the first in line
                write.to(_Write.DONE)
            for write in batch.writes[1:]:  # asleep: only the leader, first, is not
                write.wake()
            if self._line:
                following = self._line[0]
                following.to(_Write.LEADING)
                following.wake()

    def samples(self) -> List[tuple]:
        """Group commit at work: how many writes are in line now, and how many
        transactions they have taken (with scheduler_requests_total, how many writes
        a transaction holds)."""
        return [("scheduler_sqlite_writes_queued", "gauge",
                 "Writes in line for the SQLite file: waiting for a transaction, or in the "
                 "one being written (group commit).", len(self._line)),
                ("scheduler_sqlite_transactions_total", "counter",
                 "SQLite transactions committed for writes, each holding one write or more "
                 "(group commit).", self._transactions)]

    # The check for room (room()) is in the INSERT itself: where there is no room, the
    # user ID is NULL, and the NOT NULL constraint refuses the row. SQLite fails that
    # one statement, with nothing written, and the transaction goes on (PostgreSQL
    # would abort it, which is why SQLStore's SQL never fails a statement). The
    # failure is told from others by SQLite's exact message. A separate SELECT would
    # cost one more statement per booking; and insertion()'s INSERT ... SELECT, into
    # a table with triggers as appointments is, has SQLite copy its rows to a
    # temporary table first (its insert.c).
    _INSERT_IF_ROOM = (f"INSERT INTO appointments ({', '.join(COLUMNS + _EVENT_MADE)}) VALUES "
                       f"((SELECT ? WHERE {room('1', '?')}), "
                       f"{', '.join('?' * (len(COLUMNS + _EVENT_MADE) - 1))}) "
                       "ON CONFLICT (user_id, date) DO NOTHING")
    _NO_ROOM = "NOT NULL constraint failed: appointments.user_id"  # SQLite's words

    def _insert(self, db: SQLDatabase, appointment: Appointment) -> int:
        row, limit = self._row(appointment), self._limit
        try:
            db.execute(self._INSERT_IF_ROOM, (row[0], limit, limit, row[0], self.user_capacity,
                                              *row[1:]))
        except sqlite3.IntegrityError as error:
            if str(error) != self._NO_ROOM:
                raise
            return 0
        return db.rowcount

    def check(self) -> None:
        """A write committed as bookings are, through the same line and lock and
        with the same deadline: whatever would fail a booking now fails it (a full
        disk, a lock held past the deadline), and reads never wait for it. A file
        found damaged, or deleted or replaced (lost), stays reported. Then, StoreFull
        if it holds its capacity."""
        if self.damaged:
            raise self._damaged()
        self._notice_lost_files()
        if self.lost is not None:
            raise self._lost()
        super().check()

    def close(self) -> None:
        with self._line_lock, self._read_lock:
            for db in (self._writer, self._reader):
                if db is not None:
                    db.close()
            if self._turns is not None:
                self._turns.close()


# --- PostgreSQL protocol (frontend/backend version 3) ---------------------------------
#
# PostgreSQL's own protocol, written as the HTTP half is: messages are built and read
# by functions over bytes that touch no socket (the protocol chapter of PostgreSQL's
# documentation, "Message Formats", is the reference for every layout here), and one
# class, PGConnection, owns each socket, its state and its deadlines. Above them:
# parse_postgres_uri() reads a connection URI as libpq does; pg_connect() tries a
# URI's hosts in order; PGPool keeps a bounded number of connections.

PG_DEFAULT_PORT = 5432
PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
PG_TARGET_SESSION_ATTRS = ("any", "read-write")
PG_MIN_CONNECT_TIMEOUT = 2  # seconds: libpq takes connect_timeout=1 as 2
PG_QUERY_TIMEOUT = 30.0  # seconds a query may take when its caller gives no deadline
PG_CANCEL_TIMEOUT = 5.0  # seconds a cancel request may take (PGConnection.cancel_query())
MAX_PG_MESSAGE_BYTES = 64 << 20  # a longer message from a server breaks its connection
MAX_PREPARED_STATEMENTS = 200  # kept per connection; the least recently used is closed
MAX_SCRAM_ITERATIONS = 10_000_000  # more, asked by a server, would stall the client
# The connection URI's parameters this service reads, each with the environment
# variable libpq takes its default from; host, port, dbname, user and password may
# also be written in the URI's body.
PG_URI_PARAMETERS = {
    "host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "password": "PGPASSWORD", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "connect_timeout": "PGCONNECT_TIMEOUT", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "application_name": "PGAPPNAME"}
# libpq's other parameters: known, and refused by name rather than as unknown.
_PG_UNSUPPORTED_PARAMETERS = frozenset({
    "hostaddr", "passfile", "channel_binding", "options", "client_encoding", "service",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "replication", "gssencmode", "sslnegotiation",
    "sslcert", "sslkey", "sslpassword", "sslcertmode", "sslcrl", "sslcrldir", "sslsni",
    "sslcompression", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version",
    "krbsrvname", "gsslib", "gssdelegation", "require_auth", "load_balance_hosts"})
# Sent at startup, so that every server speaks alike: text in UTF-8, dates as
# YYYY-MM-DD, floats exactly, bytea in hex.
_PG_SESSION = {"client_encoding": "UTF8", "DateStyle": "ISO", "extra_float_digits": "3",
               "bytea_output": "hex"}


class PGSettings(NamedTuple):
    """Where and how to reach PostgreSQL, as parse_postgres_uri() reads a URI. A host
    that starts with "/" is the directory of a Unix-domain socket (no TLS there, as
    with libpq). repr() and redacted_uri never show the password."""

    hosts: Tuple[Tuple[str, int], ...]
    user: str
    password: Optional[str] = None
    database: Optional[str] = None  # None: the user's name
    sslmode: str = "prefer"
    sslrootcert: Optional[str] = None  # None: ~/.postgresql/root.crt, for verify-* only
    connect_timeout: Optional[float] = None  # seconds for each host; None: a share of the caller's
    target_session_attrs: str = "any"
    application_name: str = "scheduler"
    # Not read from a URI: run-time parameters for each session, as (name, value)
    # pairs (a store sets its search_path and its isolation level). Sent in the
    # StartupMessage, which takes any of them (the protocol's "Message Formats").
    session: Tuple[Tuple[str, str], ...] = ()

    @property
    def redacted_uri(self) -> str:
        """The settings as a URI for messages and logs: everything but the password."""
        quote = functools.partial(urllib.parse.quote, safe="")
        hosts = ",".join(f"{_host_in_uri(host)}:{port}" for host, port in self.hosts)
        params = [(name, getattr(self, name)) for name in (
            "sslmode", "sslrootcert", "connect_timeout", "target_session_attrs",
            "application_name") if getattr(self, name) != self._field_defaults[name]]
        query = "&".join(f"{name}={quote(f'{value:g}' if isinstance(value, float) else value)}"
                         for name, value in params)
        return (f"postgresql://{quote(self.user)}@{hosts}/{quote(self.database or self.user)}"
                + (f"?{query}" if query else ""))

    def __repr__(self) -> str:
        return f"PGSettings({self.redacted_uri!r})"


def _host_in_uri(host: str) -> str:
    if host.startswith("/"):
        return urllib.parse.quote(host, safe="")
    return f"[{host}]" if ":" in host else host


def _address(host: str, port: int) -> str:
    """host:port as messages name it ([::1]:5432; a socket's directory as it is)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("/") else f"{host}:{port}"


def is_postgres_uri(text: str) -> bool:
    """Whether --db names PostgreSQL (a connection URI) rather than an SQLite file."""
    return text.startswith(("postgresql://", "postgres://"))


# A "%" that does not begin a percent-encoding: one needs two hex digits after it
# (RFC 3986 section 2.1); "%" itself is sent as %25.
LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _percent_decoded(text: str, what: str) -> str:
    """text with its %XX escapes decoded, as libpq decodes each part of a URI (a "+"
    stays a "+"); ValueError naming what (never quoting a password) if it is not
    valid percent-encoded UTF-8, or decodes to NUL."""
    if "%" not in text:
        return text
    if LONE_PERCENT.search(text):
        raise ValueError(f"{what} has a '%' that is not followed by two hex digits")
    if re.search(r"%00", text):
        raise ValueError(f"{what} has %00 (NUL), which libpq forbids")
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not percent-encoded UTF-8") from None


def _default_socket_directory() -> str:
    """Where libpq looks for the server's Unix-domain socket when no host is given:
    Debian's directory if there is one, else /tmp (PostgreSQL's own default)."""
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _os_user() -> str:
    """The operating system's user, as libpq finds it."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a user ID with no name (in a container, say)
        return os.environ.get("USER", "postgres")


def parse_postgres_uri(text: str, environ: Mapping[str, str] = os.environ) -> PGSettings:
    """The PGSettings of a connection URI, read as libpq reads one:

        postgresql://[user[:password]@][host][:port][,...][/dbname][?name=value[&...]]

    Every part is percent-decoded; an IPv6 host is written in brackets; each host
    may have its own port. The parameters are those of PG_URI_PARAMETERS (and libpq's
    ssl=true, which is sslmode=require); what the URI leaves out comes from the
    environment variable libpq reads (PGPASSWORD for the password...), then from
    libpq's defaults: the operating system's user, a database named after the user,
    port 5432, sslmode=prefer, the Unix-domain socket for no host. Raises
    ValueError saying what is wrong; its message never holds the password."""
    if not is_postgres_uri(text):
        raise ValueError("a PostgreSQL URI starts with postgresql:// or postgres://")
    rest = text.split("://", 1)[1]
    # The user information ends at the first "@" before any "/" (libpq's rule), so a
    # password with "@" or "/" in it must be percent-encoded. Where it is not, what
    # follows is read as hosts and ports, and an error would quote the password:
    # then the error says only that.
    at, slash = rest.find("@"), rest.find("/")
    userinfo = None
    if at != -1 and (slash == -1 or at < slash):
        userinfo, rest = rest[:at], rest[at + 1:]
    try:
        settings = _pg_settings(_uri_values(userinfo, rest), environ)
        if any("@" in host for host, _ in settings.hosts):
            raise ValueError("a host name has an '@'")
        return settings
    except ValueError as error:
        if "@" in rest:
            raise ValueError("the PostgreSQL URI cannot be read: it has an '@' after the one "
                             "that ends the user name and password (write '@' as %40 and "
                             "'/' as %2F in a password)") from None
        raise ValueError(f"the PostgreSQL URI cannot be read: {error}") from None


def _uri_values(userinfo: Optional[str], rest: str) -> Dict[str, str]:
    """libpq's parameters that a URI gives (after "scheme://" and the user
    information), percent-decoded."""
    given: Dict[str, str] = {}
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        if user:
            given["user"] = user
        if colon and password:
            given["password"] = password
    hosts: List[str] = []
    ports: List[str] = []
    while True:  # host[:port], separated by commas
        if rest.startswith("["):
            end = rest.find("]")
            if end == -1:
                raise ValueError("an IPv6 host address has no closing ']'")
            if end == 1:
                raise ValueError("an IPv6 host address in brackets is empty")
            host, rest = rest[1:end], rest[end + 1:]
            if rest and rest[0] not in ":/?,":
                raise ValueError(f"unexpected {rest[0]!r} after the IPv6 address [{host}] "
                                 "(expected ':', '/', '?' or ',')")
        else:
            host_end = re.match(r"[^:/?,]*", rest).end()
            host, rest = rest[:host_end], rest[host_end:]
        port = ""
        if rest.startswith(":"):
            port_end = re.match(r"[^/?,]*", rest[1:]).end() + 1
            port, rest = rest[1:port_end], rest[port_end:]
        hosts.append(host)
        ports.append(port)
        if not rest.startswith(","):
            break
        rest = rest[1:]
    if any(hosts):
        given["host"] = ",".join(hosts)
    if any(ports):
        given["port"] = ",".join(ports)
    path, _, query = rest.partition("?")  # path is empty or starts with "/"
    if path[1:]:
        given["dbname"] = path[1:]
    for field in query.split("&") if query else ():
        name, equals, value = field.partition("=")
        if not equals:
            raise ValueError(f"the parameter {name[:40]!r} has no '=' and value")
        if "=" in value:
            raise ValueError(f"the parameter {name[:40]!r} has a second '='")
        name = _percent_decoded(name, "a parameter's name")
        if name == "ssl" and value == "true":  # what JDBC writes; libpq takes it too
            name, value = "sslmode", "require"
        if name not in PG_URI_PARAMETERS:
            if name in _PG_UNSUPPORTED_PARAMETERS:
                raise ValueError(f"the parameter {name!r} is not supported by this service; "
                                 f"it takes {', '.join(PG_URI_PARAMETERS)}")
            raise ValueError(f"unknown parameter {name[:40]!r}; this service takes "
                             f"{', '.join(PG_URI_PARAMETERS)}")
        given[name] = value  # a later one wins, as in libpq
    return {name: _percent_decoded(value, "the password" if name == "password"
                                   else f"the {name}") for name, value in given.items()}


def _pg_settings(values: Dict[str, str], environ: Mapping[str, str]) -> PGSettings:
    """PGSettings from libpq's parameters (decoded), with the environment's and
    libpq's defaults for those missing; ValueError if one is bad."""
    for name, variable in PG_URI_PARAMETERS.items():
        if name not in values and environ.get(variable):
            values[name] = environ[variable]
    hosts = values.get("host", "").split(",")
    ports = values.get("port", "").split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    elif len(ports) != len(hosts):
        raise ValueError(f"{len(ports)} ports were given for {len(hosts)} hosts")
    pairs = []
    for host, port in zip(hosts, ports):
        port = port.strip()
        if not port:
            number = PG_DEFAULT_PORT
        elif port.isdigit() and port.isascii() and 1 <= int(port) <= 65535:
            number = int(port)
        else:
            raise ValueError(f"{port[:20]!r} is not a port number (1-65535)")
        pairs.append((host or _default_socket_directory(), number))
    sslrootcert = values.get("sslrootcert") or None
    # libpq 16: sslrootcert=system means the system's CAs, and verify-full by default
    sslmode = values.get("sslmode") or ("verify-full" if sslrootcert == "system" else "prefer")
    if sslmode not in PG_SSLMODES:
        raise ValueError(f"sslmode {sslmode[:20]!r} is not one of {', '.join(PG_SSLMODES)}")
    if sslrootcert == "system" and sslmode != "verify-full":
        raise ValueError(f"sslmode={sslmode} may not be used with sslrootcert=system (the "
                         "system's CAs trust any certificate a public CA signed for any "
                         "name); use verify-full")
    timeout = values.get("connect_timeout", "").strip()
    if timeout and not re.fullmatch(r"[-+]?[0-9]+", timeout):
        raise ValueError(f"connect_timeout {timeout[:20]!r} is not a whole number of seconds")
    seconds = int(timeout) if timeout else 0
    attrs = values.get("target_session_attrs") or "any"
    if attrs not in PG_TARGET_SESSION_ATTRS:
        known = ("read-only", "primary", "standby", "prefer-standby")
        raise ValueError(f"target_session_attrs={attrs[:20]} is "
                         f"{'not supported by this service' if attrs in known else 'unknown'}"
                         f"; use {' or '.join(PG_TARGET_SESSION_ATTRS)}")
    user = values.get("user") or _os_user()
    return PGSettings(
        hosts=tuple(pairs), user=user, password=values.get("password"),
        database=values.get("dbname") or user, sslmode=sslmode, sslrootcert=sslrootcert,
        # zero or less: no timeout of its own, as in libpq (the caller's deadline holds)
        connect_timeout=float(max(seconds, PG_MIN_CONNECT_TIMEOUT)) if seconds > 0 else None,
        target_session_attrs=attrs,
        application_name=values.get("application_name",
                                    PGSettings._field_defaults["application_name"]))


class PGError(Exception):
    """An ErrorResponse from the server, by its fields (each keyed by its code
    letter: "C" the SQLSTATE, "M" the message, "D" the detail, "n" the constraint...).
    str() is the severity and message alone: never the SQL, never the detail (which
    may quote the row's values)."""

    def __init__(self, fields: Dict[str, str]):
        super().__init__(fields)
        self.fields = fields

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"

    sqlstate = property(lambda self: self.fields.get("C", ""))
    severity = property(lambda self: self.fields.get("V") or self.fields.get("S", "ERROR"))
    message = property(lambda self: self.fields.get("M", ""))
    constraint = property(lambda self: self.fields.get("n"))

    @property
    def fatal(self) -> bool:
        """Whether the server ends the session with it."""
        return self.severity in ("FATAL", "PANIC")


class PGConnectionError(Exception):
    """The database cannot be reached, or a connection to it failed: nothing
    listening, a refused login or TLS, a certificate that does not verify, a
    connection lost, a server that broke the protocol, a deadline passed. The
    message names the host and port (or the pool) and the reason; never the
    password. error: the server's own ErrorResponse, when it sent one (a FATAL).

    Subclasses: PGTimeout, when a deadline passed (a frozen server, a partition, a
    busy pool); PGConnectionLost, when an open connection failed while in use;
    PGProtocolError, when the server broke the protocol. Raised by a query, each
    means that whether the query took effect is unknown (it may have committed),
    unless it is a PGConnectionLost whose ran is False."""

    def __init__(self, reason: str, host: Optional[str] = None, port: Optional[int] = None,
                 error: Optional[PGError] = None):
        self.reason, self.host, self.port, self.error = reason, host, port, error
        where = f"{_address(host, port)}: " if host is not None else ""
        super().__init__(where + reason)

    @property
    def sqlstate(self) -> Optional[str]:
        return self.error.sqlstate if self.error is not None else None


class PGTimeout(PGConnectionError):
    """A deadline passed: connecting, waiting for an answer, or waiting for the pool."""


class PGConnectionLost(PGConnectionError):
    """An open connection broke while in use (closed, reset, a FATAL from the server).
    ran is False where the server certainly did not run the query: the connection
    had broken before it was sent, or the server's first answer to it was a FATAL
    (it answers in order, so it ended the session before it began the query: a
    session ended while idle, say). Else it is None: unknown."""

    ran: Optional[bool] = None


class PGProtocolError(PGConnectionError):
    """The server sent what the protocol does not allow there: its connection is
    not used again."""


class _TLSRefused(PGConnectionError):
    """TLS failed (the handshake, or the server refused the session over it): with
    sslmode=prefer, the host is tried again without TLS, as libpq does."""


# Messages, built. Each frontend message is a type byte and an Int32 length that
# counts itself; the startup-phase ones (StartupMessage, SSLRequest) have no type.

_INT16, _INT32 = struct.Struct("!h"), struct.Struct("!i")
_HEADER = struct.Struct("!Bi")  # a backend message's type and length
_PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
SYNC = b"S\0\0\0\4"
TERMINATE = b"X\0\0\0\4"
EXECUTE = b"E\0\0\0\x09\0\0\0\0\0"  # the unnamed portal, all its rows
DESCRIBE_PORTAL = b"D\0\0\0\x06P\0"  # the unnamed portal


def _cstring(text: str, what: str = "text") -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError(f"{what} may not contain NUL")
    return data + b"\0"


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def startup_message(parameters: Mapping[str, str]) -> bytes:
    """StartupMessage: protocol 3.0 and the session's parameters (user, database...)."""
    body = _INT32.pack(_PROTOCOL_3_0) + b"".join(
        _cstring(name) + _cstring(value, name) for name, value in parameters.items()) + b"\0"
    return _INT32.pack(len(body) + 4) + body


def cancel_request_message(backend_pid: int, secret_key: int) -> bytes:
    """CancelRequest: the one message of a connection of its own, made to ask the
    server to cancel what the session with this BackendKeyData runs now. The server
    answers nothing, and closes the connection ("Canceling Requests in Progress")."""
    return struct.pack("!iiii", 16, 80877102, backend_pid, secret_key)


def password_message(password: bytes) -> bytes:
    """PasswordMessage: a cleartext or md5 password, NUL-terminated."""
    if b"\0" in password:
        raise ValueError("the password may not contain NUL")
    return _message(b"p", password + b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _message(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _message(b"p", data)


def parse_message(name: str, sql: str) -> bytes:
    """Parse: a named prepared statement, its parameters' types left to the server."""
    return _message(b"P", _cstring(name) + _cstring(sql, "the SQL") + b"\0\0")


_NULL = b"\xff\xff\xff\xff"
_NO_FORMATS = b"\0\0"  # every parameter (or every column) in text format
_TRUE, _FALSE = b"\0\0\0\1t", b"\0\0\0\1f"


def bind_message(statement: str, params: Union[tuple, list]) -> bytes:
    """Bind: the statement's parameters to the unnamed portal, every value sent
    apart from the SQL. None is NULL; str, int, float and bool go in text format;
    bytes (bytea) in binary format, which for bytea is the bytes themselves. The
    results are asked for in text format."""
    values = []
    binary = False
    for value in params:
        kind = type(value)
        if kind is str:
            data = value.encode()
        elif value is None:
            values.append(_NULL)
            continue
        elif kind is bool:
            values.append(_TRUE if value else _FALSE)
            continue
        elif isinstance(value, int):  # (bool, an int too, is above: it cannot be subclassed)
            data = b"%d" % value
        elif isinstance(value, float):
            data = repr(value).encode()  # "inf" and "nan" are what float8in reads too
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            binary = True
        elif isinstance(value, str):
            data = str(value).encode()
        else:
            raise TypeError(f"a query parameter may be None, str, int, float, bool or "
                            f"bytes, not {kind.__name__}")
        values.append(_INT32.pack(len(data)) + data)
    if binary:
        formats = _INT16.pack(len(params)) + b"".join(
            b"\0\1" if isinstance(value, (bytes, bytearray, memoryview)) else b"\0\0"
            for value in params)
    else:
        formats = _NO_FORMATS
    if len(values) > 65535:
        raise ValueError("a query may have 65,535 parameters at most")
    return _message(b"B", b"\0" + _cstring(statement) + formats + _INT16.pack(len(values))
                    + b"".join(values) + _NO_FORMATS)


def close_statement_message(name: str) -> bytes:
    return _message(b"C", b"S" + _cstring(name))


def query_message(sql: str) -> bytes:
    """Query: the simple protocol, for SQL without parameters (schema steps)."""
    return _message(b"Q", _cstring(sql, "the SQL"))


# Placeholders: the SQL this service shares with SQLite writes "?"; PostgreSQL wants
# $1, $2... Outside of literals, quoted names, comments and dollar quotes, each "?"
# becomes the next $n. (So the jsonb operators ?, ?| and ?& cannot be written; use
# jsonb_exists() and its kin.)
_SQL_SKIPPED = re.compile(r"""(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'"""
                          r"""|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/"""
                          r"""|(?<![\w$])\$([A-Za-z_]\w*|)\$.*?\$\1\$|(\?)""", re.S)


@functools.lru_cache(maxsize=512)
def numbered_placeholders(sql: str) -> str:
    """sql with each "?" placeholder written as PostgreSQL's $1, $2...; once per text."""
    if "?" not in sql:
        return sql
    numbers = itertools.count(1)
    return _SQL_SKIPPED.sub(lambda found: f"${next(numbers)}" if found.group(2)
                            else found.group(0), sql)


# Messages, read. next_message() frames them; the parse_... functions read the body
# of one. A malformed message is a PGProtocolError.

def next_message(data: Union[bytes, bytearray], start: int = 0) -> Optional[Tuple[int, int, int]]:
    """The message at data[start:]: (its type byte, where its body starts, where it
    ends); None while it is not whole."""
    if len(data) - start < 5:
        return None
    kind, length = _HEADER.unpack_from(data, start)
    if length < 4 or length > MAX_PG_MESSAGE_BYTES:
        raise PGProtocolError(f"a message of type {chr(kind)!r} claims a length of {length}")
    end = start + 1 + length
    return (kind, start + 5, end) if end <= len(data) else None


def _fields(body: bytes, what: str) -> List[bytes]:
    """The NUL-terminated strings a body is made of (its last byte a NUL)."""
    if not body.endswith(b"\0"):
        raise PGProtocolError(f"{what} is not NUL-terminated")
    return body[:-1].split(b"\0")


def parse_error_fields(body: bytes) -> Dict[str, str]:
    """ErrorResponse and NoticeResponse: each field a code byte and a string; a NUL
    after the last."""
    if body == b"\0":
        return {}
    fields = _fields(body, "an ErrorResponse")
    if fields[-1] != b"":
        raise PGProtocolError("an ErrorResponse does not end with an empty field")
    parsed = {}
    for field in fields[:-1]:
        if not field:
            raise PGProtocolError("an ErrorResponse has a field with no code")
        parsed[chr(field[0])] = field[1:].decode("utf-8", "replace")
    return parsed


# Authentication request codes (the "R" message's Int32) this client answers...
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = (
    0, 3, 5, 10, 11, 12)
# ...and those it does not.
_AUTH_UNSUPPORTED = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI",
                     9: "SSPI"}


def parse_authentication(body: bytes) -> Tuple[int, bytes]:
    """An Authentication request: its code, and what follows it (the md5 salt, the
    SASL mechanisms or data)."""
    if len(body) < 4:
        raise PGProtocolError("an Authentication message is too short")
    code = _INT32.unpack_from(body)[0]
    data = body[4:]
    if (code in (AUTH_OK, AUTH_CLEARTEXT) and data) or (code == AUTH_MD5 and len(data) != 4):
        raise PGProtocolError(f"an Authentication message of code {code} has "
                              f"{len(data)} bytes after its code")
    return code, data


def parse_sasl_mechanisms(data: bytes) -> List[str]:
    fields = _fields(data, "the list of SASL mechanisms")
    if not fields or fields[-1] != b"":
        raise PGProtocolError("the list of SASL mechanisms does not end with an empty name")
    return [field.decode("utf-8", "replace") for field in fields[:-1]]


def parse_parameter_status(body: bytes) -> Tuple[str, str]:
    fields = _fields(body, "a ParameterStatus")
    if len(fields) != 2:
        raise PGProtocolError("a ParameterStatus is not a name and a value")
    return fields[0].decode("utf-8", "replace"), fields[1].decode("utf-8", "replace")


def parse_backend_key_data(body: bytes) -> Tuple[int, int]:
    if len(body) != 8:
        raise PGProtocolError("a BackendKeyData is not 8 bytes")
    return struct.unpack("!ii", body)


def parse_ready_for_query(body: bytes) -> str:
    """The transaction status: "I" idle, "T" in a transaction, "E" in a failed one."""
    if body not in (b"I", b"T", b"E"):
        raise PGProtocolError(f"a ReadyForQuery has the transaction status {body[:8]!r}")
    return body.decode()


def parse_command_complete(body: bytes) -> Tuple[str, int]:
    """CommandComplete: the tag ("INSERT 0 1", "SELECT 3", "BEGIN") and the rows
    it counts (-1 for a command that counts none)."""
    tag = _fields(body, "a CommandComplete")[0].decode("utf-8", "replace")
    last = tag.rpartition(" ")[2]
    counted = tag.split(" ", 1)[0] in ("INSERT", "UPDATE", "DELETE", "SELECT", "MERGE",
                                       "MOVE", "FETCH", "COPY")
    return tag, int(last) if counted and last.isdigit() else -1


def _bytea(text: bytes) -> bytes:
    if not text.startswith(b"\\x"):
        raise PGProtocolError("a bytea value is not in hex format")
    return binascii.unhexlify(text[2:])


# How a text-format value becomes a Python value, by its type's OID (pg_type):
# text, varchar, bpchar, name -> str; int2, int4, int8, oid -> int; float4, float8
# -> float; bool -> bool; bytea -> bytes. Any other type is str (a date, numeric...).
_DECODE_TEXT = bytes.decode  # UTF-8
PG_DECODERS: Dict[int, Callable[[bytes], object]] = {
    25: _DECODE_TEXT, 1043: _DECODE_TEXT, 1042: _DECODE_TEXT, 19: _DECODE_TEXT,
    21: int, 23: int, 20: int, 26: int, 700: float, 701: float,
    16: {b"t": True, b"f": False}.__getitem__, 17: _bytea}


def parse_row_description(body: bytes) -> Tuple[Tuple[str, int], ...]:
    """RowDescription: each column's name and type OID."""
    if len(body) < 2:
        raise PGProtocolError("a RowDescription is too short")
    count, at, columns = _INT16.unpack_from(body)[0], 2, []
    for _ in range(count):
        end = body.find(b"\0", at)
        if end == -1 or end + 19 > len(body):
            raise PGProtocolError("a RowDescription is too short for its columns")
        oid = _INT32.unpack_from(body, end + 7)[0]
        columns.append((body[at:end].decode("utf-8", "replace"), oid))
        at = end + 19  # table OID, column number, type OID, size, modifier, format
    if at != len(body):
        raise PGProtocolError("a RowDescription is longer than its columns")
    return tuple(columns)


def decode_rows(data: bytes, messages: List[Tuple[int, int, int]],
                decoders: tuple) -> List[tuple]:
    """The rows of DataRow messages, each framed in data as next_message() frames
    it, as tuples of values decoded by decoders (one per column, from PG_DECODERS).
    The one loop that runs once per value: no function of this module's is called
    per value, only the built-in decoders. A row is checked against its message's
    length; a malformed row is a PGProtocolError."""
    rows = []
    append, unpack, count = rows.append, _INT32.unpack_from, _INT16.unpack_from
    width = len(decoders)
    try:
        for _, start, end in messages:
            if count(data, start)[0] != width:
                raise PGProtocolError(f"a DataRow has not the {width} columns described")
            at, row = start + 2, []
            add = row.append
            for decode in decoders:
                size, = unpack(data, at)
                at += 4
                if size < 0:
                    add(None)
                else:
                    stop = at + size
                    add(decode(data[at:stop]))
                    at = stop
            if at != end:
                raise PGProtocolError("a DataRow's values do not fill its length")
            append(tuple(row))
    except (struct.error, ValueError, KeyError) as error:
        if isinstance(error, UnicodeDecodeError):
            raise
        raise PGProtocolError(f"a DataRow is malformed ({error})") from None
    return rows


# Authentication: the password's proofs, with no socket.

def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The answer to AuthenticationMD5Password: "md5" and the hex MD5 of the hex MD5
    of the password and user name, salted."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest().encode()


def saslprep(text: str) -> Optional[str]:
    """text prepared by SASLprep (RFC 4013, a profile of stringprep, RFC 3454), or
    None where the profile prohibits it. ASCII is left as it is, as PostgreSQL's
    own pg_saslprep() does."""
    if text.isascii():
        return text
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text
                     if not stringprep.in_table_b1(c))  # section 2.1
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)  # section 2.2
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
                  stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
                  stringprep.in_table_a1)  # sections 2.3 and 2.5: unassigned code points
    if any(check(c) for c in prepared for check in prohibited):
        return None
    right_to_left = [stringprep.in_table_d1(c) for c in prepared]  # section 2.4 (RFC 3454 6)
    if any(right_to_left) and (any(map(stringprep.in_table_d2, prepared))
                               or not (right_to_left[0] and right_to_left[-1])):
        return None
    return prepared


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, "sha256").digest()


@functools.lru_cache(maxsize=16)
def _salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """SaltedPassword, Hi(password, salt, iterations) of RFC 5802 section 3: PBKDF2
    with HMAC-SHA-256, the costly part of a login by design. Kept, as that section
    lets a client ("MAY cache ... SaltedPassword"), by all three: a server offers a
    user the same salt and count at every login, so a pool's next connection, or
    every one after a failover, skips it; a new salt (the password set again) is
    a new entry."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


class ScramSHA256:
    """The client's side of SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel
    binding ("n,,"): client_first(), then client_final(server's first message),
    then check_server_final(server's last). Pure: the nonce is given or random.
    PostgreSQL takes the user from the startup message and ignores the one here,
    so it is empty by default. A server that cannot prove it knows the password
    (its signature, RFC 5802 section 3) is refused: PGConnectionError."""

    MECHANISM = "SCRAM-SHA-256"

    def __init__(self, password: str, nonce: Optional[str] = None, user: str = ""):
        prepared = saslprep(password)  # PostgreSQL uses the password as it is when it fails
        self._password = (password if prepared is None else prepared).encode()
        self._nonce = nonce if nonce is not None else _b64(os.urandom(18))
        name = user.replace("=", "=3D").replace(",", "=2C")  # section 5.1
        self._first_bare = f"n={name},r={self._nonce}"
        self._server_signature: Optional[bytes] = None

    def client_first(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8", "replace")
        attributes = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        nonce, salt, iterations = (attributes.get(key, "") for key in "rsi")
        if text.startswith("m=") or not (nonce and salt and iterations):
            raise PGProtocolError("the server's first SCRAM message is not r=...,s=...,i=...")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise PGProtocolError("the server's SCRAM nonce does not extend the client's")
        if not iterations.isdigit() or not 1 <= int(iterations) <= MAX_SCRAM_ITERATIONS:
            raise PGProtocolError(f"the server asks for {iterations[:12]!r} SCRAM iterations")
        try:
            salt_bytes = base64.b64decode(salt, validate=True)
        except binascii.Error:
            raise PGProtocolError("the server's SCRAM salt is not base64") from None
        salted = _salted_password(self._password, salt_bytes, int(iterations))
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c=biws,r={nonce}"  # biws: base64 of "n,,"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def check_server_final(self, server_final: bytes) -> None:
        text = server_final.decode("utf-8", "replace")
        if self._server_signature is None:
            raise PGProtocolError("the server ended SCRAM before the client's proof")
        if text.startswith("e="):
            raise PGConnectionError(f"SCRAM authentication failed: {text[2:200]}")
        found = re.match(r"v=([A-Za-z0-9+/]+={0,2})(?:,|$)", text)
        try:
            signature = base64.b64decode(found.group(1), validate=True) if found else b""
        except binascii.Error:  # padding
            signature = b""
        if not hmac.compare_digest(signature, self._server_signature):
            raise PGConnectionError("the server's SCRAM signature is wrong: it does not know "
                                    "the password (is it the server it claims to be?)")


# TLS, as libpq's sslmode asks: prefer and require encrypt without checking who
# answers (require with an sslrootcert given checks the chain, as libpq does);
# verify-ca checks the certificate against the CA; verify-full the host name too.

def _root_certificate(settings: PGSettings) -> Optional[str]:
    """The CA file to verify against; None for none (require, prefer, allow)."""
    if settings.sslrootcert is not None:
        return settings.sslrootcert
    if settings.sslmode.startswith("verify-"):
        return os.path.join(os.path.expanduser("~"), ".postgresql", "root.crt")
    return None


def tls_context(settings: PGSettings) -> ssl.SSLContext:
    """The SSLContext for a connection's TLS, from the settings' sslmode and
    sslrootcert; one per CA file and its version, kept. ValueError if the CA file
    cannot be read."""
    path = _root_certificate(settings)
    version = None
    if path not in (None, "system"):
        try:
            version = os.stat(path).st_mtime_ns
        except OSError as error:
            raise ValueError(f"the root certificate file {path!r} cannot be read "
                             f"({error.strerror}): give sslrootcert, or use a sslmode that "
                             "does not verify the server") from None
    return _tls_context(settings.sslmode == "verify-full", path, version)


@functools.lru_cache(maxsize=16)
def _tls_context(check_host: bool, path: Optional[str], version: Optional[int]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # libpq's ssl_min_protocol_version
    context.set_alpn_protocols(["postgresql"])  # what PostgreSQL 17 expects, if any
    context.check_hostname = check_host
    if path is None:
        context.verify_mode = ssl.CERT_NONE
    elif path == "system":
        context.load_default_certs()
    else:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"the root certificate file {path!r} has no certificate that "
                             f"can be read ({error})") from None
    return context


class Result(NamedTuple):
    """What a query returned: its rows (tuples, values decoded by PG_DECODERS), the
    rows its tag counts (-1 when it counts none) and the tag ("INSERT 0 1")."""

    rows: List[tuple]
    rowcount: int
    tag: str


class _Statement:
    """A prepared statement a connection keeps: its name, and how to decode its rows
    (None until the server has described them; () for a statement with none)."""

    __slots__ = ("name", "decoders")

    def __init__(self, name: str):
        self.name, self.decoders = name, None


# Message types, as the byte values a backend message starts with.
(_AUTHENTICATION, _PARAMETER_STATUS, _BACKEND_KEY_DATA, _READY_FOR_QUERY, _ERROR_RESPONSE,
 _NOTICE_RESPONSE, _NOTIFICATION, _PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE,
 _ROW_DESCRIPTION, _NO_DATA, _DATA_ROW, _COMMAND_COMPLETE, _EMPTY_QUERY,
 _NEGOTIATE_VERSION) = b"RSKZENA123TnDCIv"
# What may arrive at any time (the protocol's "asynchronous" messages).
_ASYNCHRONOUS = frozenset({_PARAMETER_STATUS, _NOTICE_RESPONSE, _NOTIFICATION})
_STOPS = frozenset({_READY_FOR_QUERY, _ERROR_RESPONSE})  # looked at as they arrive
_COMMIT_WORDS = re.compile(r"\s*(?:COMMIT|END)\b", re.I)


class PGConnection:
    """One connection to a PostgreSQL server: the one object that owns its socket,
    its state and its deadlines. connect() opens one; query() runs a statement with
    the extended query protocol, queries() several in one round trip; close() ends
    it. Not for two threads at once (the pool lends each to one).

        state      what it is doing                  what it accepts
        new        opened, not yet started           start()
        starting   TLS, authentication, parameters   the startup messages
        ready      idle, after ReadyForQuery          query(), queries(), run_script(),
                                                     check_idle()
        busy       a query is under way              nothing: a second call fails
        broken     an I/O or protocol error, a FATAL  nothing, ever again
        closed     close() was called

    Any call in another state, or a message the protocol does not allow in the
    state, fails loudly (RuntimeError for the caller's mistake; PGProtocolError
    for the server's, which breaks the connection). Every wait has a deadline
    (time.monotonic()); when it passes, the connection breaks (PGTimeout), and a
    query under way is cancelled (cancel_query()).

    Each SQL text becomes a named prepared statement on its first use (Parse), and
    is then run by Bind and Execute alone; the MAX_PREPARED_STATEMENTS most recently
    used are kept. Its "?" placeholders are written as $1, $2... (see
    numbered_placeholders()); parameter types are the server's inference, so cast
    where it has none (SELECT ?::int).

    A COMMIT that the server answers with ROLLBACK (it does, without an error, when
    the transaction had failed) raises PGError 25P02 (in_failed_sql_transaction), as
    pgjdbc does; the tag is on every Result too."""

    NEW, STARTING, READY, BUSY, BROKEN, CLOSED = (
        "new", "starting", "ready", "busy", "broken", "closed")

    def __init__(self, sock: socket.socket, settings: PGSettings, host: str, port: int,
                 timeout: float = PG_QUERY_TIMEOUT):
        self._sock = sock
        self.settings, self.host, self.port = settings, host, port
        self.timeout = timeout  # for query() without a deadline
        self.parameters: Dict[str, str] = {}  # ParameterStatus: server_version...
        self.backend_pid: Optional[int] = None  # BackendKeyData (cancel_query())
        self.secret_key: Optional[int] = None
        self.transaction_status: Optional[str] = None  # from the last ReadyForQuery
        self.tls = False
        self._state = self.NEW
        self._buffer = bytearray()  # received and not yet taken
        self._statements: "collections.OrderedDict[str, _Statement]" = collections.OrderedDict()
        self._to_close: List[str] = []  # statements dropped, closed with the next query
        self._names = itertools.count(1)
        self._deadline_started = 0.0  # time.monotonic() when the current wait began
        self._poll: Optional[select.poll] = None  # made at the first wait (_wait())
        self._polled = 0  # the events it waits for

    def __repr__(self) -> str:
        return f"<PGConnection {_address(self.host, self.port)} {self._state}>"

    @property
    def state(self) -> str:
        return self._state

    @property
    def broken(self) -> bool:
        return self._state == self.BROKEN

    # Opening

    @classmethod
    def connect(cls, settings: PGSettings, host: str, port: int, deadline: float,
                timeout: float = PG_QUERY_TIMEOUT) -> "PGConnection":
        """A started connection to one host, or PGConnectionError saying why not. TLS
        as settings.sslmode asks; with allow (prefer), a server that refuses the
        connection without TLS (with it) is tried once more with it (without), as
        libpq does. No TLS on a Unix-domain socket (libpq's rule too)."""
        mode = "no" if host.startswith("/") else {
            "disable": "no", "allow": "no", "prefer": "try"}.get(settings.sslmode, "must")
        try:
            return cls._connect(settings, host, port, deadline, mode, timeout)
        except _TLSRefused:
            if mode != "try":
                raise
            return cls._connect(settings, host, port, deadline, "no", timeout)
        except PGConnectionError as error:
            if error.error is None or settings.sslmode != "allow" or mode != "no" \
                    or isinstance(error, PGTimeout):
                raise
            return cls._connect(settings, host, port, deadline, "must", timeout)

    @classmethod
    def _connect(cls, settings: PGSettings, host: str, port: int, deadline: float,
                 tls: str, timeout: float) -> "PGConnection":
        started = time.monotonic()
        try:
            if host.startswith("/"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(max(deadline - started, 0.001))
                try:
                    sock.connect(os.path.join(host, f".s.PGSQL.{port}"))
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = _open_tcp(host, port, deadline)
        except socket.timeout:
            raise PGTimeout(f"no connection within {deadline - started:.1f} s", host,
                            port) from None
        except OSError as error:
            raise PGConnectionError(_os_reason(error), host, port) from None
        connection = cls(sock, settings, host, port, timeout)
        try:
            connection.start(deadline, tls)
        except PGConnectionError as error:
            connection.close()
            if tls == "try" and connection.tls and error.error is not None:
                raise _TLSRefused(error.reason, host, port, error.error) from None
            raise
        except BaseException:
            connection.close()
            raise
        return connection

    def start(self, deadline: float, tls: str = "no") -> None:
        """Begin the session on the connected socket: TLS (tls "no", "try" or
        "must"), the StartupMessage, authentication, and the server's parameters,
        up to its first ReadyForQuery."""
        self._expect(self.NEW, "start()")
        self._state = self.STARTING
        self._deadline_started = time.monotonic()
        try:
            if tls != "no":
                self._negotiate_tls(deadline, tls == "must")
            settings = self.settings
            self._send(startup_message({
                "user": settings.user, "database": settings.database or settings.user,
                "application_name": settings.application_name, **_PG_SESSION,
                **dict(settings.session)}), deadline)
            self._authenticate(deadline)
            while True:
                kind, body = self._next(deadline)
                if kind == _BACKEND_KEY_DATA:
                    self.backend_pid, self.secret_key = parse_backend_key_data(body)
                elif kind == _READY_FOR_QUERY:
                    self.transaction_status = parse_ready_for_query(body)
                    break
                elif kind == _ERROR_RESPONSE:
                    self._refused(body)
                else:
                    self._unexpected(kind, "after authentication")
        except PGProtocolError as error:
            if error.host is None:
                self._fail(PGProtocolError, error.reason)
            raise
        self._state = self.READY

    def _negotiate_tls(self, deadline: float, required: bool) -> None:
        """SSLRequest, and TLS if the server answers S. The answer is one byte, and
        nothing may follow it before the TLS handshake: bytes there were not sent by
        the server in TLS, and would be read as if they were (CVE-2021-23222)."""
        self._send(SSL_REQUEST, deadline)
        answer = self._receive_exactly(1, deadline)
        if answer == b"N":
            if required:
                self._fail(_TLSRefused, "the server does not accept TLS (its ssl is off), and "
                                        f"sslmode={self.settings.sslmode} requires it")
            return
        if answer == b"E":
            self._fail(PGConnectionError, "the server answered the TLS request with an error "
                                          "(it is older than PostgreSQL 7.0?)")
        if answer != b"S":
            self._fail(PGProtocolError, f"the server answered the TLS request with {answer!r}")
        try:
            self._sock.settimeout(0)
            pending = self._sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pending = b""
        except OSError as error:
            self._fail(PGConnectionLost, _os_reason(error))
        if pending:
            self._fail(PGProtocolError, "the server sent more than the one byte that answers "
                                        "the TLS request: refused (CVE-2021-23222)")
        try:
            context = tls_context(self.settings)
        except ValueError as error:
            self._fail(PGConnectionError, str(error))
        try:
            self._sock.settimeout(self._remaining(deadline, "the TLS handshake"))
            self._sock = context.wrap_socket(
                self._sock, server_hostname=None if self.host.startswith("/") else self.host)
        except socket.timeout:
            self._fail(PGTimeout, "no TLS handshake within the deadline")
        except ssl.SSLCertVerificationError as error:
            self._fail(PGConnectionError, "the server's certificate does not verify "
                                          f"(sslmode={self.settings.sslmode}): "
                                          f"{error.verify_message or error.reason}")
        except (ssl.SSLError, OSError) as error:
            self._fail(_TLSRefused, f"the TLS handshake failed: {_os_reason(error)}")
        self.tls = True

    def _authenticate(self, deadline: float) -> None:
        """Answer the server's Authentication requests until AuthenticationOk: SCRAM
        (its server signature checked before Ok is believed), md5, or cleartext over
        TLS only; trust asks for nothing."""
        scram: Optional[ScramSHA256] = None
        expected = (AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL)
        while True:
            kind, body = self._next(deadline)
            if kind == _ERROR_RESPONSE:
                self._refused(body)
            if kind == _NEGOTIATE_VERSION:
                self._fail(PGProtocolError, "the server does not speak protocol 3.0")
            if kind != _AUTHENTICATION:
                self._unexpected(kind, "during authentication")
            code, data = parse_authentication(body)
            if code in _AUTH_UNSUPPORTED:
                self._fail(PGConnectionError, f"the server asks for {_AUTH_UNSUPPORTED[code]} "
                                              "authentication, which this service does not "
                                              "support; use scram-sha-256")
            if code not in expected:
                self._fail(PGProtocolError, f"the server sent authentication request {code} "
                                            "out of turn")
            if code == AUTH_OK:
                return
            password = self.settings.password
            if password is None:
                self._fail(PGConnectionError, "the server asks for a password and none was "
                                              "given: put it in the URI or in PGPASSWORD")
            if code == AUTH_CLEARTEXT:
                if not self.tls:
                    self._fail(PGConnectionError, "the server asks for the password in clear "
                                                  "text over a connection without TLS: "
                                                  "refused (use sslmode=require)")
                self._send(password_message(password.encode()), deadline)
            elif code == AUTH_MD5:
                self._send(password_message(md5_password(self.settings.user, password, data)),
                           deadline)
            elif code == AUTH_SASL:
                mechanisms = parse_sasl_mechanisms(data)
                if ScramSHA256.MECHANISM not in mechanisms:
                    self._fail(PGConnectionError, "the server offers SASL mechanisms "
                                                  f"{', '.join(mechanisms)}; this service "
                                                  "speaks SCRAM-SHA-256")
                scram = ScramSHA256(password, _scram_nonce())
                self._send(sasl_initial_response(ScramSHA256.MECHANISM, scram.client_first()),
                           deadline)
                expected = (AUTH_SASL_CONTINUE,)
                continue
            elif code == AUTH_SASL_CONTINUE:
                self._send(sasl_response(scram.client_final(data)), deadline)
                expected = (AUTH_SASL_FINAL,)
                continue
            elif code == AUTH_SASL_FINAL:
                try:
                    scram.check_server_final(data)
                except PGConnectionError as error:
                    self._fail(type(error), error.reason)
            expected = (AUTH_OK,)  # one answer is all: then Ok, or an ErrorResponse

    def _refused(self, body: bytes) -> None:
        """The server's ErrorResponse at startup: it refuses the connection."""
        error = PGError(parse_error_fields(body))
        self._fail(PGConnectionError, f"the server refused the connection: {error} "
                                      f"(SQLSTATE {error.sqlstate})", error)

    # Running queries

    def query(self, sql: str, params: Union[tuple, list] = (),
              deadline: Optional[float] = None) -> Result:
        """Run one statement with its parameters (see bind_message()) by the extended
        query protocol, and return its Result. PGError when the server refuses it,
        once the server is ready again (the connection stays usable, and the
        transaction, if any, has failed); PGConnectionError when the connection
        fails (a FATAL, a lost connection, a deadline passed: it is then broken)."""
        return self.queries(((sql, params),), deadline)[0]

    def queries(self, statements: Sequence[Tuple[str, Union[tuple, list]]],
                deadline: Optional[float] = None) -> List[Result]:
        """Run statements ((sql, params) each) one after the other in one round trip,
        as query() runs one, and return their Results. The server runs them until
        one fails, and skips the rest (pipelining: one Sync after them all; the
        protocol chapter of PostgreSQL's documentation, 55.2.4); that one's PGError
        is raised. Outside a transaction they run in
        one of their own, committed at the end; a first statement BEGIN opens one
        that they are in, and that stays open."""
        self._expect(self.READY, "query()")
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        status = self.transaction_status
        with self._busy():
            try:
                return self._run(statements, deadline)
            except PGError as error:
                if error.sqlstate not in ("0A000", "26000") or status != "I" \
                        or self.transaction_status != "I" \
                        or all(sql in self._statements for sql, _ in statements):
                    raise
                # A kept statement the server no longer has (26000), or whose result
                # changed with the schema ("cached plan must not change result type"):
                # outside a transaction nothing happened, so once more, prepared anew.
                return self._run(statements, deadline)

    @contextlib.contextmanager
    def _busy(self):
        """Around a query: a protocol error breaks the connection, and so does any
        other (an interrupt, say) that leaves an answer half read; a PGError, raised
        once the answer is read whole, leaves it ready."""
        try:
            yield
        except PGProtocolError as error:
            if error.host is None:
                self._fail(PGProtocolError, error.reason)
            raise
        except BaseException:
            if self._state == self.BUSY:
                self._break()
            raise

    def _run(self, statements: Sequence[Tuple[str, Union[tuple, list]]],
             deadline: float) -> List[Result]:
        closing = self._to_close[:]
        batch = b"".join(map(close_statement_message, closing))
        # What answers, in order: CloseComplete for each statement closed; then for each
        # statement ParseComplete (if parsed now), BindComplete, RowDescription or NoData
        # (if described now), its DataRows, then CommandComplete or EmptyQueryResponse.
        # An ErrorResponse at any point ends them (the server skips the rest until
        # Sync). ReadyForQuery last. owners: the statement each expected one answers.
        expected, owners = [_CLOSE_COMPLETE] * len(closing), [-1] * len(closing)
        plans: List[Tuple[str, _Statement, bool]] = []
        for index, (sql, params) in enumerate(statements):
            statement = self._statements.get(sql)
            parsing = statement is None
            if parsing:
                statement = next((plan[1] for plan in plans if plan[0] == sql), None)
            if statement is None:  # new, and not parsed earlier in this batch
                statement = _Statement(f"s{next(self._names)}")
                batch += parse_message(statement.name, numbered_placeholders(sql))
                expected.append(_PARSE_COMPLETE)
                owners.append(index)
            elif not parsing:
                self._statements.move_to_end(sql)
            plans.append((sql, statement, parsing))
            batch += bind_message(statement.name, params)
            if statement.decoders is None:
                batch += DESCRIBE_PORTAL + EXECUTE
                expected += (_BIND_COMPLETE, _ROW_DESCRIPTION, _COMMAND_COMPLETE)
                owners += (index, index, index)
            else:
                batch += EXECUTE
                expected += (_BIND_COMPLETE, _COMMAND_COMPLETE)
                owners += (index, index)
        self._state = self.BUSY
        self._send(batch + SYNC, deadline)
        data, messages = self._read_until_ready(deadline)
        self._state = self.READY
        step, error, failing, done = 0, None, -1, len(expected)
        rows: List[list] = [[] for _ in plans]
        tags: List[Tuple[str, int]] = [("", -1)] * len(plans)
        for message in messages:
            kind, start, end = message
            if kind == _DATA_ROW and step < done and expected[step] == _COMMAND_COMPLETE \
                    and error is None:
                rows[owners[step]].append(message)  # decode_rows() checks its columns
                continue
            if kind == _READY_FOR_QUERY:
                if error is None and step != done:
                    self._unexpected(kind, "before the query's end")
                break
            if kind == _ERROR_RESPONSE and error is None:
                error = PGError(parse_error_fields(data[start:end]))
                failing = owners[step] if step < done else -1
                continue
            want = expected[step] if step < done and error is None else None
            if kind == want or (want, kind) in ((_ROW_DESCRIPTION, _NO_DATA),
                                                (_COMMAND_COMPLETE, _EMPTY_QUERY)):
                owner = owners[step]
                step += 1
            elif kind in _ASYNCHRONOUS:
                self._asynchronous(kind, data[start:end])
                continue
            else:
                self._unexpected(kind, "in answer to a query")
            if kind == _CLOSE_COMPLETE:
                self._to_close.remove(closing.pop(0))
            elif kind == _PARSE_COMPLETE:
                self._keep(plans[owner][0], plans[owner][1])
            elif kind == _ROW_DESCRIPTION:
                plans[owner][1].decoders = tuple(
                    PG_DECODERS.get(oid, _DECODE_TEXT)
                    for _, oid in parse_row_description(data[start:end]))
            elif kind == _NO_DATA:
                plans[owner][1].decoders = ()
            elif kind == _COMMAND_COMPLETE:
                tags[owner] = parse_command_complete(data[start:end])
        if error is not None:
            if failing >= 0 and error.sqlstate in ("0A000", "26000") and not plans[failing][2]:
                sql, statement, _ = plans[failing]
                self._statements.pop(sql, None)  # prepared anew at its next use
                if error.sqlstate == "0A000":
                    self._to_close.append(statement.name)
            raise error
        results = []
        for (sql, statement, _), found, (tag, rowcount) in zip(plans, rows, tags):
            if tag == "ROLLBACK" and _COMMIT_WORDS.match(sql):
                raise PGError({"S": "ERROR", "V": "ERROR", "C": "25P02", "M": (
                    "the transaction had failed, so the server rolled it back at COMMIT")})
            results.append(Result(_decoded(data, found, statement.decoders), rowcount, tag))
        return results

    def _keep(self, sql: str, statement: _Statement) -> None:
        """Keep a statement the server has prepared; close the least recently used
        one when more than MAX_PREPARED_STATEMENTS are kept."""
        self._statements[sql] = statement
        if len(self._statements) > MAX_PREPARED_STATEMENTS:
            self._to_close.append(self._statements.popitem(last=False)[1].name)

    def run_script(self, sql: str, deadline: Optional[float] = None) -> List[Result]:
        """Run SQL that has no parameters, one or more statements (a schema step), by
        the simple query protocol: a Result for each statement. PGError as query()
        raises it; the statements before the failing one are then committed unless
        the script opened a transaction (the simple protocol's rule)."""
        self._expect(self.READY, "run_script()")
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        message = query_message(sql)
        with self._busy():
            self._state = self.BUSY
            self._send(message, deadline)
            data, messages = self._read_until_ready(deadline)
            self._state = self.READY
            results, error, decoders, rows = [], None, None, []
            for message in messages:
                kind, start, end = message
                body = data[start:end]
                if kind == _ROW_DESCRIPTION and decoders is None:
                    decoders = tuple(PG_DECODERS.get(oid, _DECODE_TEXT)
                                     for _, oid in parse_row_description(body))
                elif kind == _DATA_ROW and decoders is not None:
                    rows.append(message)
                elif kind in (_COMMAND_COMPLETE, _EMPTY_QUERY):
                    tag, rowcount = parse_command_complete(body) if kind == _COMMAND_COMPLETE \
                        else ("", -1)
                    results.append(Result(_decoded(data, rows, decoders or ()), rowcount,
                                          tag))
                    decoders, rows = None, []
                elif kind == _ERROR_RESPONSE and error is None:
                    error = PGError(parse_error_fields(body))
                elif kind in _ASYNCHRONOUS:
                    self._asynchronous(kind, body)
                elif kind != _READY_FOR_QUERY:
                    self._unexpected(kind, "in answer to a script")
            if error is not None:
                raise error
            return results

    def session_read_only(self, deadline: float) -> Optional[str]:
        """Why the session cannot write (a hot standby, default_transaction_read_only
        on), or None when it can: from the parameters PostgreSQL 14 and later report,
        else by asking the server (SHOW transaction_read_only), as libpq does for
        target_session_attrs=read-write."""
        standby = self.parameters.get("in_hot_standby")
        read_only = self.parameters.get("default_transaction_read_only")
        if standby == "on":
            return "the server is a hot standby (read-only)"
        if read_only == "on":
            return "default_transaction_read_only is on"
        if standby is None or read_only is None:
            if self.query("SHOW transaction_read_only", deadline=deadline).rows[0][0] == "on":
                return "transaction_read_only is on"
        return None

    def check_idle(self) -> bool:
        """Whether an idle connection may still be used, found without waiting: the
        server may have closed it, or sent a FATAL (pg_terminate_backend(), a
        shutdown) that would otherwise be read only as the answer to its next query.
        What arrives while idle is read; a ParameterStatus is kept (in_hot_standby
        changes at a promotion); an ErrorResponse, anything else or end of file
        breaks it. With target_session_attrs=read-write, a session that has become
        read-only is not usable either."""
        if self._state != self.READY:
            return False
        try:
            if self._sock.gettimeout() != 0:
                self._sock.settimeout(0)
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                    break
                if not chunk:
                    raise ConnectionResetError("the server closed the connection")
                self._buffer += chunk
            while self._buffer:
                found = next_message(self._buffer)
                if found is None:  # part of a message: it is saying something; stop using it
                    raise PGProtocolError("part of a message arrived while idle")
                kind, start, end = found
                body = bytes(self._buffer[start:end])
                del self._buffer[:end]
                if kind not in _ASYNCHRONOUS:
                    raise PGProtocolError(f"message {chr(kind)!r} arrived while idle")
                self._asynchronous(kind, body)
        except (OSError, PGConnectionError):
            self._break()
            return False
        if self.settings.target_session_attrs == "read-write" and (
                self.parameters.get("in_hot_standby") == "on"
                or self.parameters.get("default_transaction_read_only") == "on"):
            return False
        return True

    def close(self) -> None:
        """End the session (Terminate, if it is usable) and close the socket."""
        if self._state == self.CLOSED:
            return
        if self._state == self.READY:
            try:
                self._sock.settimeout(0)
                self._sock.send(TERMINATE)
            except OSError:
                pass
        self._state = self.CLOSED
        self._sock.close()

    def cancel_query(self) -> None:
        """Ask the server to cancel what this session runs now, as libpq's PQcancel()
        does: a CancelRequest on a connection of its own, in plain TCP (the key is
        good for this one session alone), sent by a thread of its own, which gives up
        after PG_CANCEL_TIMEOUT, so that the caller's answer does not wait for it.
        Whether the server could cancel it, no one is told: the protocol says nothing
        back."""
        if self.backend_pid is None or self.secret_key is None:
            return
        message, host, port = cancel_request_message(self.backend_pid, self.secret_key), \
            self.host, self.port

        def send() -> None:
            deadline = time.monotonic() + PG_CANCEL_TIMEOUT
            try:
                with contextlib.closing(_open_tcp(host, port, deadline)) as sock:
                    sock.sendall(message)
                    sock.settimeout(max(0.0, deadline - time.monotonic()))
                    sock.recv(1)  # until the server closes it, once it has acted
            except OSError:  # nothing more to do: the connection is broken all the same
                pass

        threading.Thread(target=send, name="postgresql-cancel", daemon=True).start()

    # Reading and writing, for the methods above.

    def _expect(self, state: str, call: str) -> None:
        if self._state == state:
            return
        if self._state == self.BROKEN:
            lost = PGConnectionLost("the connection broke earlier and is not used again",
                                    self.host, self.port)
            lost.ran = False
            raise lost
        raise RuntimeError(f"{call} on a PostgreSQL connection that is {self._state}")

    def _remaining(self, deadline: float, doing: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            self._fail(PGTimeout, f"the deadline passed before {doing}")
        return left

    # The socket is non-blocking (timeout 0), and a send or receive that cannot go on
    # now waits in poll() until the deadline. A round trip then takes three system
    # calls (send, poll, receive), each letting go of the GIL; a socket timeout
    # would take twice as many.

    def _wait(self, events: int, deadline: float) -> bool:
        """Wait until the socket is ready for events (select.POLLIN, POLLOUT), or the
        deadline: False if it passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._sock, events)
        elif events != self._polled:
            self._poll.modify(self._sock, events)
        self._polled = events
        return bool(self._poll.poll(math.ceil(left * 1000)))

    def _send(self, data: bytes, deadline: float) -> None:
        self._remaining(deadline, "sending")
        if self._sock.gettimeout() != 0:
            self._sock.settimeout(0)
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self._sock.send(view):]
                    continue
                except (BlockingIOError, ssl.SSLWantWriteError):
                    events = select.POLLOUT
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                if not self._wait(events, deadline):
                    self._fail(PGTimeout, "the server took no more data within the deadline")
        except OSError as error:  # nothing sent yet: nothing run
            self._fail(PGConnectionLost, _os_reason(error), ran=False if
                       len(view) == len(data) else None)

    def _receive(self, deadline: float, size: int = 65536) -> None:
        """Add what the server sends next to the buffer, waiting until the deadline."""
        self._remaining(deadline, "the server's answer")
        if self._sock.gettimeout() != 0:
            self._sock.settimeout(0)
        events = 0 if self.tls and self._sock.pending() else select.POLLIN  # TLS: read ahead
        try:
            while True:
                if events and not self._wait(events, deadline):
                    waited = time.monotonic() - self._deadline_started
                    self._fail(PGTimeout, f"the server did not answer within the deadline "
                                          f"({waited:.1f} s)")
                try:
                    chunk = self._sock.recv(size)
                    break
                except (BlockingIOError, ssl.SSLWantReadError):
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
        except OSError as error:
            self._fail(PGConnectionLost, _os_reason(error))
        if not chunk:
            self._fail(PGConnectionLost, "the server closed the connection")
        self._buffer += chunk

    def _receive_exactly(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            self._receive(deadline, size - len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _next(self, deadline: float) -> Tuple[int, bytes]:
        """The next message (for the startup phase), its type and body; a Notice
        or ParameterStatus is dealt with here."""
        while True:
            found = next_message(self._buffer)
            if found is None:
                self._receive(deadline)
                continue
            kind, start, end = found
            body = bytes(self._buffer[start:end])
            del self._buffer[:end]
            if kind in _ASYNCHRONOUS:
                self._asynchronous(kind, body)
                continue
            return kind, body

    def _read_until_ready(self, deadline: float) -> Tuple[bytes, List[Tuple[int, int, int]]]:
        """Every message up to and including ReadyForQuery, as the bytes and each
        message's (type, start, end) in them, as next_message() frames it: one pass
        over the messages as they arrive. A FATAL ErrorResponse ends the session:
        PGConnectionLost."""
        self._deadline_started = time.monotonic()
        buffer, at, messages = self._buffer, 0, []
        append, header, stops = messages.append, _HEADER.unpack_from, _STOPS
        while True:
            size = len(buffer)
            while size - at >= 5:
                kind, length = header(buffer, at)
                end = at + 1 + length
                if length < 4 or length > MAX_PG_MESSAGE_BYTES:
                    raise PGProtocolError(f"a message of type {chr(kind)!r} claims a length "
                                          f"of {length}")
                if end > size:
                    break
                append((kind, at + 5, end))
                if kind in stops:
                    body = bytes(buffer[at + 5:end])
                    if kind == _READY_FOR_QUERY:
                        self.transaction_status = parse_ready_for_query(body)
                        data = bytes(buffer[:end])
                        del buffer[:end]
                        return data, messages
                    error = PGError(parse_error_fields(body))
                    if error.fatal:
                        self._fail(PGConnectionLost, f"the server ended the session: {error} "
                                                     f"(SQLSTATE {error.sqlstate})", error,
                                   ran=False if len(messages) == 1 else None)
                at = end
            self._receive(deadline)

    def _asynchronous(self, kind: int, body: bytes) -> None:
        if kind == _PARAMETER_STATUS:
            name, value = parse_parameter_status(body)
            self.parameters[name] = value
        # A NoticeResponse (a warning) and a NotificationResponse (LISTEN) are dropped.

    def _unexpected(self, kind: int, where: str) -> None:
        self._fail(PGProtocolError, f"the server sent message {chr(kind)!r} {where}")

    def _break(self) -> None:
        self._state = self.BROKEN
        self._buffer.clear()
        try:
            self._sock.close()
        except OSError:
            pass

    def _fail(self, kind: type, reason: str, error: Optional[PGError] = None,
              ran: Optional[bool] = None) -> None:
        """Break the connection and raise kind (a PGConnectionError) naming the host;
        ran as PGConnectionLost has it. A query given up at its deadline is cancelled
        too (cancel_query()): else its backend would go on, waiting for a lock or a
        synchronous standby with no client to answer, past the pool's bound on
        connections, and commit whenever it could."""
        if kind is PGTimeout and self._state == self.BUSY:
            self.cancel_query()
        self._break()
        failure = kind(reason, self.host, self.port, error)
        if ran is not None:
            failure.ran = ran
        raise failure


def _decoded(data: bytes, rows: List[Tuple[int, int, int]], decoders: tuple) -> List[tuple]:
    """decode_rows(), with text that is not UTF-8 (from a SQL_ASCII database, say) an
    error of the query, not of the connection."""
    try:
        return decode_rows(data, rows, decoders) if rows else []
    except UnicodeDecodeError:
        raise PGError({"S": "ERROR", "V": "ERROR", "C": "22021",
                       "M": "a text value from the server is not UTF-8"}) from None


def _scram_nonce() -> str:
    return _b64(os.urandom(18))


def _os_reason(error: OSError) -> str:
    """A socket error as the end of a sentence: "connection refused"."""
    if isinstance(error, socket.gaierror):
        return f"its name does not resolve ({error.strerror})"
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


def _open_tcp(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to host:port, trying each of its addresses until the
    deadline (which bounds each attempt, unlike socket.create_connection()'s
    timeout). Looking the name up has no deadline of its own."""
    last: OSError = OSError("no address")
    for family, kind, protocol, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, protocol)
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # as libpq does
            return sock
        except socket.timeout:
            sock.close()
            raise
        except OSError as error:
            sock.close()
            last = error
    raise last


def pg_connect(settings: PGSettings, deadline: float,
               timeout: float = PG_QUERY_TIMEOUT) -> PGConnection:
    """A connection to the first of the settings' hosts that will do, tried in
    order: one that answers and, with target_session_attrs=read-write, whose session
    can write (so that after a failover, the promoted standby is found). Each host
    gets connect_timeout seconds, within the deadline; without it, an equal share
    of what is left for it and the hosts after it (libpq would wait on it for
    ever), so that a host that never answers (a lost machine, a partition) leaves
    the next one time: after a failover, that is the new primary. PGConnectionError
    naming each host tried and why it would not do (PGTimeout if the deadline
    passed)."""
    failures: List[PGConnectionError] = []
    for index, (host, port) in enumerate(settings.hosts):
        now = time.monotonic()
        if now >= deadline and failures:
            break
        until = now + (deadline - now) / (len(settings.hosts) - index) \
            if settings.connect_timeout is None else min(deadline, now + settings.connect_timeout)
        try:
            connection = PGConnection.connect(settings, host, port, until, timeout)
        except PGConnectionError as error:
            failures.append(error)
            continue
        if settings.target_session_attrs == "read-write":
            try:
                why = connection.session_read_only(until)
            except (PGConnectionError, PGError) as error:
                connection.close()
                failures.append(error if isinstance(error, PGConnectionError)
                                else PGConnectionError(str(error), host, port))
                continue
            if why is not None:
                connection.close()
                failures.append(PGConnectionError(f"{why}, and target_session_attrs="
                                                  "read-write", host, port))
                continue
        return connection
    if len(failures) == 1:
        raise failures[0]
    kind = PGTimeout if time.monotonic() >= deadline else PGConnectionError
    raise kind(f"no host of {settings.redacted_uri} will do: "
               + "; ".join(str(failure) for failure in failures))


class PGPool:
    """At most size connections to the settings' database, lent one at a time:

        with pool.connection(deadline) as connection:
            connection.query(...)

    waits for a free connection until the deadline (else PGTimeout, "pool busy").
    An idle connection is checked before it is lent (check_idle()), and replaced if
    the server closed it or ended its session meanwhile; one that broke while lent,
    or is given back inside a transaction that cannot be rolled back, is closed.
    New connections go through pg_connect(), so after a failover they find the new
    primary. timeout: the seconds a wait may take when the caller gives no deadline,
    and each query's default. take() and give_back() do what connection() does, for
    a caller that holds a connection across calls of its own."""

    def __init__(self, settings: PGSettings, size: int = 10, timeout: float = PG_QUERY_TIMEOUT):
        if size < 1:
            raise ValueError("a pool needs room for one connection at least")
        self.settings, self.size, self.timeout = settings, size, timeout
        self._idle: List[PGConnection] = []  # the most recently used last
        self._open = 0  # connections open or being opened, lent or idle
        self._changed = threading.Condition()  # guards the two above and _closed
        self._closed = False

    @contextlib.contextmanager
    def connection(self, deadline: Optional[float] = None):
        connection = self.take(time.monotonic() + self.timeout if deadline is None
                               else deadline)
        try:
            yield connection
        finally:
            self.give_back(connection)

    def take(self, deadline: float) -> PGConnection:
        while True:
            with self._changed:
                while not self._idle and self._open >= self.size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PGTimeout(f"pool busy: all {self.size} connections to "
                                        f"{self.settings.redacted_uri} stayed in use until "
                                        "the deadline")
                    self._changed.wait(left)
                if self._closed:
                    raise PGConnectionError("the pool is closed")
                if not self._idle:
                    self._open += 1
                    break
                connection = self._idle.pop()
            if connection.check_idle():
                return connection
            self._discard(connection)
        try:
            return pg_connect(self.settings, deadline, self.timeout)
        except BaseException:
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise

    def give_back(self, connection: PGConnection) -> None:
        if connection.state == PGConnection.READY and connection.transaction_status != "I":
            try:
                connection.query("ROLLBACK")
            except (PGError, PGConnectionError):
                pass
        with self._changed:
            if connection.state == PGConnection.READY and not self._closed \
                    and connection.transaction_status == "I":
                self._idle.append(connection)
                self._changed.notify()
                return
        self._discard(connection)

    def _discard(self, connection: PGConnection) -> None:
        connection.close()
        with self._changed:
            self._open -= 1
            self._changed.notify()

    def close(self) -> None:
        """Close the idle connections now, and each lent one when it is given back."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for connection in idle:
            self._discard(connection)


# --- PostgreSQL store -----------------------------------------------------------------
# Appointments in a PostgreSQL database that any number of servers share: the SQL of
# SQLStore, run through the protocol above.

POSTGRES_SCHEMA = "scheduler"  # the PostgreSQL schema (namespace) the tables live in
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # needs no quotes, fits NAMEDATALEN
PG_POOL_SIZE = 8  # connections each process keeps to the database, at most
PG_CONNECT_TIMEOUT = 10.0  # seconds a start may take to connect, where the URI gives none
# SQLSTATEs after which a write runs again, in a new transaction: another transaction
# overtook it (serialization_failure, deadlock_detected), or inserted the same key or
# appointment first (unique_violation, which SQLStore's SQL otherwise never meets).
_PG_RETRIED = frozenset({"40001", "40P01", "23505"})
_PG_RETRIES = 5  # runs of one write at most, within its deadline
# Bookings without a key go to the database in batches, one INSERT each (see
# PostgresStore.book()): at most PG_BATCHES of a process's under way at once (one,
# as SQLite's group commit has, so that those that come meanwhile make the next
# batch), each of at most PG_BATCH_SIZE bookings.
PG_BATCHES = 1
PG_BATCH_SIZE = 32
# SQLSTATE classes after which a retry soon may succeed (a 503 with Retry-After): the
# server restarting or failing over (08 connection exception, 57 operator
# intervention: a shutdown, a server starting up, a cancelled statement), short of
# resources (53: too many connections...), and a standby that refuses writes (25006,
# read_only_sql_transaction, met in the moment a failover takes). Any other error
# (a privilege revoked, a table dropped, a full disk) waits for the operator.
_PG_PASSING = ("08", "57", "53", "25006")
# A login refused (SQLSTATE class 28: a password or role changed; 3D000: no such
# database; 42501: no CONNECT privilege) waits for the operator, not for a retry.
_PG_LOGIN_REFUSED = ("28", "3D000", "42501")
# The schema's steps, as in SQLite: step n brings the tables from version n - 1 to n,
# each a tuple of statements run in one transaction with the others a start needs,
# under the schema's lock; the version is in schema_version. A step that shipped is
# frozen, literal SQL; a change of the tables gets a new step. The tables are SQLStore's.
# Step 1's CHECK constraints held the parsers' rules as far as SQL can say them, that
# release's values written out; step 2 keeps what no rule's value decides (the forms,
# and NFC, which PostgreSQL has; not the invisible characters: a row with them is never
# asked for, since no request can name its user), so that a rule that changes needs no
# step. A row past a bound of the rules (past_the_bounds()) is never shown: a user ID
# too long cannot be asked for, and any other such row is left out and set aside by
# the first write in its way, as SQLStore says. No start sweeps, as SQLite's does: a
# server of an older release, restarted while one with wider rules serves, would set
# aside every row that only the wider rules take. The count of appointments is spread
# over PG_COUNT_SLOTS rows, each written by the connections whose backend's process ID
# it is modulo 64, so that bookings by different connections do not take turns at
# one row (as REPEATABLE READ would have them, one failing with 40001 for each).
_PG_STEP_1 = (
    """CREATE TABLE schema_version (
        application text NOT NULL CHECK (application = 'scheduler'),
        version integer NOT NULL)""",
    "INSERT INTO schema_version VALUES ('scheduler', 0)",
    """CREATE TABLE appointments (
        user_id text COLLATE "C" NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 256
            AND user_id = btrim(user_id, ' ') AND user_id !~ '[\\x01-\\x1f\\x7f]'
            AND user_id IS NFC NORMALIZED),
        date text COLLATE "C" NOT NULL CHECK (date ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'
            AND date BETWEEN '2000-01-01' AND '2099-12-31'
            AND to_char(to_date(date, 'YYYY-MM-DD'), 'YYYY-MM-DD') = date),
        time text COLLATE "C" NOT NULL CHECK (time ~ '^([01][0-9]|2[0-3]):(00|30)$'),
        note text CHECK (char_length(note) BETWEEN 1 AND 500),
        PRIMARY KEY (user_id, date))""",
    """CREATE TABLE set_aside (user_id text, date text, time text, note text,
        reason text NOT NULL, since timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE appointment_count (
        slot integer PRIMARY KEY CHECK (slot BETWEEN 0 AND 63), n bigint NOT NULL)""",
    "INSERT INTO appointment_count SELECT slot, 0 FROM generate_series(0, 63) AS slot",
    """CREATE TABLE users (user_id text COLLATE "C" PRIMARY KEY,
        appointments integer NOT NULL, version bigint NOT NULL)""",
    """CREATE FUNCTION count_appointments() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            UPDATE users SET appointments = appointments - 1, version = version + 1
                WHERE user_id = OLD.user_id;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO users VALUES (NEW.user_id, 1, 1) ON CONFLICT (user_id) DO UPDATE
                SET appointments = users.appointments + 1, version = users.version + 1;
        END IF;
        IF TG_OP <> 'UPDATE' THEN
            UPDATE appointment_count SET n = n + CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END
                WHERE slot = pg_backend_pid() % 64;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER counted AFTER INSERT OR UPDATE OR DELETE ON appointments
        FOR EACH ROW EXECUTE FUNCTION count_appointments()""",
    """CREATE TABLE idempotency_keys (
        user_id text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL,
        fingerprint bytea NOT NULL, kept double precision NOT NULL, changed boolean NOT NULL,
        status integer NOT NULL, media_type text, headers text NOT NULL, body bytea,
        PRIMARY KEY (user_id, key))""",
    "CREATE INDEX idempotency_keys_by_age ON idempotency_keys (kept)",
    "CREATE INDEX idempotency_keys_unchanged ON idempotency_keys (kept) WHERE NOT changed",
)
_PG_STEP_2 = (
    """ALTER TABLE appointments
        DROP CONSTRAINT appointments_user_id_check,
        DROP CONSTRAINT appointments_date_check,
        DROP CONSTRAINT appointments_time_check,
        DROP CONSTRAINT appointments_note_check,
        ADD CONSTRAINT appointments_user_id_check CHECK (char_length(user_id) >= 1
            AND user_id = btrim(user_id, ' ') AND user_id !~ '[\\x01-\\x1f\\x7f]'
            AND user_id IS NFC NORMALIZED),
        ADD CONSTRAINT appointments_date_check CHECK (date ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'
            AND to_char(to_date(date, 'YYYY-MM-DD'), 'YYYY-MM-DD') = date),
        ADD CONSTRAINT appointments_time_check
            CHECK (time ~ '^([01][0-9]|2[0-3]):[0-5][0-9]$'),
        ADD CONSTRAINT appointments_note_check CHECK (char_length(note) >= 1)""",
)
# Step 3 makes each appointment a calendar event, as SQLite's step 7 does.
_PG_STEP_3 = (
    """ALTER TABLE appointments
        ADD COLUMN event_key text COLLATE "C" CHECK (char_length(event_key) >= 1),
        ADD COLUMN sequence integer NOT NULL DEFAULT 0 CHECK (sequence >= 0),
        ADD COLUMN modified bigint""",
)
PG_SCHEMA_STEPS = (_PG_STEP_1, _PG_STEP_2, _PG_STEP_3)  # new ones go last
PG_SCHEMA_VERSION = len(PG_SCHEMA_STEPS)


class Batches:
    """Work that many threads hand in, done a batch at a time: a thread's work
    waits until fewer than at_once batches are under way; then the thread whose
    work is the oldest waiting takes what waits (up to size items, and at most one
    an item's key, when key is given) and does it for everyone, in one call of
    do(items, deadline), the deadline that of the oldest; the others wait for
    their outcome. The work that comes while a batch is under way makes the next
    one, so the busier it gets, the more each batch does.

    An item's life:
        waiting   handed in (run()), not yet in a batch: it may give up at its
                  deadline, nothing done (timed_out() says why)
        taken     in a batch that a thread is doing
        done      with its outcome: do()'s result for it, or what do() raised,
                  which is raised in each thread whose item the batch held
    """

    WAITING, TAKEN, DONE = "waiting", "taken", "done"

    class _Item:
        __slots__ = ("work", "deadline", "state", "outcome", "error")

        def __init__(self, work, deadline: float):
            self.work, self.deadline, self.state = work, deadline, Batches.WAITING
            self.outcome, self.error = None, None

    def __init__(self, do: Callable[[list, float], list], timed_out: Callable[[], Exception],
                 at_once: int = 1, size: int = 32, key: Optional[Callable] = None):
        self.do, self.timed_out = do, timed_out
        self.at_once, self.size, self.key = at_once, size, key
        self._changed = threading.Condition()  # guards the two below and each item's state
        self._waiting: List[Batches._Item] = []  # in the order they came
        self._under_way = 0

    def run(self, work, deadline: float):
        """Do work in a batch, by the deadline; return its outcome."""
        item = self._Item(work, deadline)
        with self._changed:
            self._waiting.append(item)
        while True:
            with self._changed:
                while item.state == self.WAITING and self._under_way >= self.at_once:
                    if not self._changed.wait(deadline - time.monotonic()) \
                            and item.state == self.WAITING:
                        self._waiting.remove(item)
                        raise self.timed_out()
                if item.state == self.TAKEN:  # in another thread's batch: do() ends by
                    # the batch's deadline, which is not after this item's; a moment more
                    if not self._changed.wait_for(lambda: item.state == self.DONE,
                                                  deadline - time.monotonic() + 1):
                        raise self.timed_out()  # (its outcome unknown, as a lost answer's)
                if item.state == self.DONE:
                    break
                batch = self._take()
            self._do(batch)
        if item.error is not None:
            raise item.error
        return item.outcome

    def _take(self) -> "List[Batches._Item]":
        """The next batch (under _changed): the oldest waiting items that fit."""
        batch: List[Batches._Item] = []
        keys: set = set()
        for item in self._waiting:
            if self.key is not None:
                key = self.key(item.work)
                if key in keys:
                    continue
                keys.add(key)
            item.state = self.TAKEN
            batch.append(item)
            if len(batch) == self.size:
                break
        self._waiting = [item for item in self._waiting if item.state == self.WAITING]
        self._under_way += 1
        return batch

    def _do(self, batch: "List[Batches._Item]") -> None:
        outcomes: list = []
        error: Optional[BaseException] = None
        try:
            outcomes = self.do([item.work for item in batch],
                               min(item.deadline for item in batch))
        except BaseException as failure:  # each item's thread raises it
            error = failure
        finally:
            with self._changed:
                self._under_way -= 1
                for item, outcome in itertools.zip_longest(batch, outcomes):
                    item.outcome, item.error, item.state = outcome, error, self.DONE
                self._changed.notify_all()


class SchemaRefused(Exception):
    """A PostgreSQL schema the service will not use: another application's, or one
    of a newer release. Raised before anything in it is changed."""


class _PGDatabase(SQLDatabase):
    """A lent PostgreSQL connection as SQLStore runs its SQL through it, each
    statement with the deadline of the request it serves. Given begin (a BEGIN
    statement), it opens the transaction with the first statement, in the same
    round trip (pipelined: see PGConnection.queries())."""

    def __init__(self, connection: PGConnection, deadline: float,
                 begin: Optional[str] = None):
        self.connection, self.deadline, self.rowcount = connection, deadline, -1
        self.begin = begin  # None once sent

    def execute(self, sql: str, parameters: tuple = ()) -> list:
        if self.begin is None:
            result = self.connection.query(sql, parameters, self.deadline)
        else:
            begin, self.begin = self.begin, None
            result = self.connection.queries(((begin, ()), (sql, parameters)),
                                             self.deadline)[1]
        self.rowcount = result.rowcount
        return result.rows


class _PGReads(SQLDatabase):
    """The database of PostgresStore.reading(): each statement goes in a batch of
    reads (Batches), run on one connection in one round trip (pipelined; see
    PGConnection.queries()), each seeing what was committed when the batch was
    sent."""

    def __init__(self, batches: Batches, deadline: float):
        self.batches, self.deadline, self.rowcount = batches, deadline, -1

    def execute(self, sql: str, parameters: tuple = ()) -> list:
        result = self.batches.run((sql, parameters), self.deadline)
        self.rowcount = result.rowcount
        return result.rows


class PostgresStore(SQLStore):
    """Appointments in a PostgreSQL database, shared by every server given the same
    settings: SQLStore's tables and SQL, in the schema named schema.

    Opening it connects (PGConnectionError if no host will do), then creates or
    upgrades the schema in one transaction under a lock of its own (an advisory
    lock), so that servers starting at once on an empty database make one schema;
    SchemaRefused, with nothing changed, for a schema that holds what this service
    did not make, or that a newer release made. An empty schema (one an operator
    made for the service's role) is taken.

    Each write is a transaction at REPEATABLE READ on a connection of the pool,
    run again when another transaction overtook it (_PG_RETRIED). Bookings
    without a key, and reads, go in batches (Batches): those that come while one
    is under way go in the next, in one round trip. Every wait (the pool, each
    statement) ends at the write's deadline, busy_timeout seconds after it began:
    a database that stops answering is StoreUnavailable, as are a lost or refused
    connection and a server shutting down. Its words go to the log (cause), never
    to a client.
    A write whose connection is lost before its COMMIT is sent, or before the
    server ran it (PGConnectionLost.ran), runs once more, as does a batch of reads
    (_read_batch()); a write lost after, whose outcome is unknown, is
    StoreUnavailable: if it was committed, so was its Idempotency-Key, and the
    client's retry with the key gets its first answer.

    capacity is checked against the count the triggers keep, as the transaction
    sees it (a batch counts its own bookings too): writes committed by others
    meanwhile are not seen, so that many servers may together store a few more
    than capacity (at most a batch of bookings a server, and one booking a
    connection, writing at that moment). user_capacity is exact: two writes of one
    user update one row of users, and the second runs again."""

    def __init__(self, settings: PGSettings, capacity: Optional[int] = None,
                 busy_timeout: float = 5.0, max_keys: int = MAX_KEYS, *,
                 user_capacity: int = MAX_APPOINTMENTS_PER_USER,
                 max_keys_per_user: int = MAX_KEYS_PER_USER,
                 schema: str = POSTGRES_SCHEMA, pool_size: int = PG_POOL_SIZE):
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema {schema!r} is not a lowercase SQL name")
        # A statement sent alone (book()'s) is a transaction of its own, at the
        # isolation level that transact() gives each of its transactions.
        self.settings = settings._replace(session=(
            ("search_path", f'"{schema}"'), ("default_transaction_isolation", "repeatable read")))
        self.schema, self.capacity, self.busy_timeout = schema, capacity, busy_timeout
        self.user_capacity = user_capacity
        self.max_keys, self.max_keys_per_user = max_keys, max_keys_per_user
        self._pool = PGPool(self.settings, pool_size, busy_timeout)
        def timed_out() -> StoreUnavailable:
            return self._unavailable(PGTimeout(
                f"pool busy: {PG_BATCHES} batches stayed under way until the deadline"))
        self._bookings = Batches(self._book_batch, timed_out, PG_BATCHES, PG_BATCH_SIZE,
                                 key=operator.attrgetter("user_id"))
        self._reads = Batches(self._read_batch, timed_out, PG_BATCHES, PG_BATCH_SIZE)
        try:
            self.notices = self._install()
        except BaseException:
            self._pool.close()
            raise

    def _install(self) -> Tuple[str, ...]:
        """Create or upgrade the schema; what was done, a sentence each."""
        timeout = self.settings.connect_timeout or PG_CONNECT_TIMEOUT
        deadline = time.monotonic() + timeout * len(self.settings.hosts) + self.busy_timeout
        where = f"schema {self.schema} of {self.settings.redacted_uri}"
        with self._pool.connection(deadline) as connection:
            encoding = connection.parameters.get("server_encoding")
            if encoding != "UTF8":  # text beyond it could not be stored, nor NFC checked
                raise SchemaRefused(f"the database of {self.settings.redacted_uri} is "
                                    f"encoded in {encoding}; this service needs UTF8 (CREATE "
                                    "DATABASE ... ENCODING 'UTF8'; nothing was changed)")

            def run(sql, parameters=()):
                return connection.query(sql, parameters, deadline).rows
            run("BEGIN ISOLATION LEVEL READ COMMITTED")  # each statement sees what is committed
            run("SELECT pg_advisory_xact_lock(hashtext(?))", (f"scheduler {self.schema}",))
            found = run("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = ?), "
                        "EXISTS (SELECT 1 FROM pg_class JOIN pg_namespace ON pg_namespace.oid "
                        "= relnamespace WHERE nspname = ?), to_regclass(?) IS NOT NULL",
                        (self.schema, self.schema, f'"{self.schema}".schema_version'))
            exists, holds_any, versioned = found[0]
            version = 0
            if versioned:
                rows = run("SELECT application, version FROM schema_version")
                if len(rows) != 1 or rows[0][0] != "scheduler":
                    raise SchemaRefused(f"{where} is not this service's: its schema_version "
                                        "table is another's (nothing was changed)")
                version = rows[0][1]
                if version > PG_SCHEMA_VERSION:
                    raise SchemaRefused(
                        f"{where} is version {version}, newer than this release's "
                        f"{PG_SCHEMA_VERSION}; run the release that wrote it (nothing was "
                        "changed)")
            elif holds_any:
                raise SchemaRefused(f"{where} holds tables this service did not make; give "
                                    "it a schema of its own (nothing was changed)")
            if not exists:
                run(f'CREATE SCHEMA "{self.schema}"')
            for step in range(version, PG_SCHEMA_VERSION):  # each in one round trip
                connection.run_script(";\n".join(PG_SCHEMA_STEPS[step]), deadline)
            if version < PG_SCHEMA_VERSION:
                run("UPDATE schema_version SET version = ?::integer", (PG_SCHEMA_VERSION,))
            run("COMMIT")
        if version == PG_SCHEMA_VERSION:
            return ()
        if version == 0:
            return (f"Created {where} (schema version {PG_SCHEMA_VERSION}).",)
        return (f"Upgraded {where} from schema version {version} to {PG_SCHEMA_VERSION}.",)

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        """A database failure as the client's 503, with Retry-After where a retry soon
        may succeed; the database's words for the log."""
        retry_after: Optional[int] = 1
        if isinstance(error, PGTimeout):
            message = (f"The database did not answer within {self.busy_timeout:g} s; "
                       "retry shortly.")
        elif isinstance(error, PGConnectionError) and (error.sqlstate or "").startswith(
                _PG_LOGIN_REFUSED):
            message, retry_after = ("The database refused this server's login; its operator "
                                    "must look into the server's log."), None
        elif isinstance(error, PGConnectionError):
            message = "The database cannot be reached now; retry shortly."
        elif error.sqlstate in _PG_RETRIED:
            message = ("The database is busy: other writes overtook this one "
                       f"{_PG_RETRIES} times in a row; retry shortly.")
        elif error.sqlstate == "53100":
            message, retry_after = ("The database cannot grow: its disk is full; its "
                                    "operator must free space."), None
        elif error.sqlstate.startswith(_PG_PASSING):
            message = "The database is restarting, failing over or overloaded; retry shortly."
        else:
            message, retry_after = ("The database refused the request; its operator must "
                                    "look into the server's log."), None
        return StoreUnavailable(message, retry_after, f"{type(error).__name__}: {error}")

    _BEGIN = "BEGIN ISOLATION LEVEL REPEATABLE READ"

    def transact(self, apply: Callable, *args):
        return self._transact(time.monotonic() + self.busy_timeout, self._BEGIN, apply, *args)

    def _transact(self, deadline: float, begin: Optional[str], apply: Callable, *args):
        """transact(), by the deadline, in a transaction that begin opens; begin None:
        apply runs one statement, which is a transaction of its own (committed as
        the server runs it, in one round trip)."""
        for run in itertools.count(1):
            committing = False
            try:
                with self._pool.connection(deadline) as connection:
                    committing = begin is None  # a statement alone commits as it runs
                    db = _PGDatabase(connection, deadline, begin)
                    try:
                        result, outcome = apply(db, *args), None
                    except (*_OUTCOMES, AlreadyKeyed) as raised:
                        result, outcome = None, raised
                    committing = True
                    if db.begin is None and begin is not None:  # else no transaction began
                        connection.query("COMMIT", (), deadline)
            except PGError as error:
                if error.sqlstate in _PG_RETRIED and run < _PG_RETRIES \
                        and time.monotonic() < deadline:
                    continue
                raise self._unavailable(error) from None
            except PGConnectionError as error:
                # Lost before what commits was sent, or before the server ran it: nothing
                # was written, and it can run again (on an idle connection that a
                # restart closed, say). Else whether it was committed is unknown: the
                # client retries, with its key.
                if isinstance(error, PGConnectionLost) and run == 1 and (
                        not committing or error.ran is False):
                    continue
                raise self._unavailable(error) from None
            if outcome is not None:
                raise outcome
            return result

    def book(self, appointment: Appointment, keyed: Optional[Keyed] = None) -> Appointment:
        """SQLStore's booking. One without a key first goes in a batch (Batches): one
        INSERT (insertion()), a transaction of its own, for the bookings that came
        while the batch before was under way, one a user. Only if that inserts
        nothing for it (the user holds that date, a row is in the way, the store or
        the user is full) does SQLStore's transaction run, to find out why, by the
        same deadline: the two together take at most busy_timeout."""
        deadline = time.monotonic() + self.busy_timeout
        if keyed is None and self._bookings.run(appointment, deadline):
            return appointment
        return self._transact(deadline, self._BEGIN, self._once_per_key, keyed, self._book,
                              appointment)

    def _book_batch(self, appointments: List[Appointment], deadline: float) -> List[bool]:
        """Whether the batch's INSERT made each appointment."""
        def insert(db: SQLDatabase) -> set:
            rows = db.execute(insertion(len(appointments)) + " RETURNING user_id",
                              tuple(self._insertion_parameters(appointments)))
            return {row[0] for row in rows}
        made = self._transact(deadline, None, insert)
        return [appointment.user_id in made for appointment in appointments]

    def _read_batch(self, statements: List[Tuple[str, tuple]], deadline: float) -> List[Result]:
        """Run the statements on one connection in one round trip, their Results. A
        connection found lost (a FATAL that came just after the pool's check of it,
        a server gone meanwhile) is given back, and they run once more on another:
        reads change nothing."""
        try:
            with self._pool.connection(deadline) as connection:
                return connection.queries(statements, deadline)
        except PGConnectionLost:
            with self._pool.connection(deadline) as connection:
                return connection.queries(statements, deadline)

    @contextlib.contextmanager
    def reading(self):
        try:
            yield _PGReads(self._reads, time.monotonic() + self.busy_timeout)
        except (PGError, PGConnectionError) as error:
            raise self._unavailable(error) from None

    def close(self) -> None:
        self._pool.close()


# --- Calendar feed (RFC 5545) ---------------------------------------------------------

CALENDAR_SUMMARY = "Appointment with a practitioner"


def _ical_text(value: str) -> str:
    """Escape a TEXT property value (RFC 5545 section 3.3.11)."""
    return (value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\n", "\\n"))


def _fold(line: str) -> str:
    """Fold a content line into pieces of at most 75 octets, never splitting a
    UTF-8 character; continuation lines start with a space (section 3.1). Cut
    as bytes: a cut moves back over continuation bytes (0b10xxxxxx) to the first
    byte of a character."""
    data = line.encode("utf-8")
    if len(data) <= 75:
        return line
    pieces, start, limit = [], 0, 75
    while len(data) - start > limit:
        end = start + limit
        while data[end] & 0xC0 == 0x80:
            end -= 1
        pieces.append(data[start:end])
        start, limit = end, 74  # the leading space takes one octet
    pieces.append(data[start:])
    return b"\r\n ".join(pieces).decode("utf-8")


@functools.lru_cache(maxsize=4096)
def _ical_instant(instant: dt.datetime) -> str:
    """A UTC DATE-TIME (section 3.3.5). Cached, as _start_strings() is: strftime()
    is slow, and a feed of many appointments shows three instants each."""
    return instant.strftime("%Y%m%dT%H%M%SZ")


@functools.lru_cache(maxsize=256)
def _user_hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def event_uid(user_id: str, event: Event) -> str:
    """The event's UID (section 3.8.4.7), the same in every feed from its booking to
    its cancellation, and no other event's: its key, unique among its user's
    events, and a hash of the user ID, which may hold characters UIDs should not."""
    return f"{event.key}-{_user_hash(user_id)}@scheduler"


# RFC 5545 section 3.6: a calendar holds at least one component. A feed with no
# appointments holds this one, which describes UTC and changes nothing: every time
# in the feed is in UTC already (the trailing Z), and none refers to it by TZID.
_UTC_TIMEZONE = ["BEGIN:VTIMEZONE", "TZID:UTC", "BEGIN:STANDARD", "DTSTART:19700101T000000",
                 "TZOFFSETFROM:+0000", "TZOFFSETTO:+0000", "TZNAME:UTC", "END:STANDARD",
                 "END:VTIMEZONE"]


# The feed's iTIP method (RFC 5546): a calendar published for others to subscribe to.
# Its media type names it too (CALENDAR_TYPE), as RFC 5545 section 8.1 asks of a
# stream whose objects all have one METHOD.
CALENDAR_METHOD = "PUBLISH"


def calendar_feed(user_id: str, events: List[Event], now: dt.datetime) -> str:
    """The user's appointments as an iCalendar object, a VEVENT each (or, for none,
    a VTIMEZONE: the object needs a component). With METHOD, the DTSTAMP of each
    event is when this object was made: now. Its UID is the same for the
    appointment's life, SEQUENCE counts its changes (section 3.8.7.4: a calendar
    takes the higher as the newer), and LAST-MODIFIED says when the last was made,
    where that is known."""
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", f"PRODID:-//scheduler//{SERVER_NAME}//EN",
             "CALSCALE:GREGORIAN", f"METHOD:{CALENDAR_METHOD}",
             f"X-WR-CALNAME:{_ical_text(f'Appointments of {user_id}')}"]
    if not events:
        lines += _UTC_TIMEZONE
    stamp = f"DTSTAMP:{_ical_instant(now)}"
    for event in events:
        appointment = event.appointment
        lines += ["BEGIN:VEVENT",
                  f"UID:{_ical_text(event_uid(user_id, event))}",
                  stamp,
                  *(() if event.modified is None else
                    (f"LAST-MODIFIED:{event.modified:%Y%m%dT%H%M%SZ}",)),  # not cached: one each
                  f"SEQUENCE:{event.sequence}",
                  f"DTSTART:{_ical_instant(appointment.start)}",
                  f"DTEND:{_ical_instant(appointment.end)}",
                  f"SUMMARY:{CALENDAR_SUMMARY}",
                  *(f"{detail.ical_property}:{_ical_text(value)}"
                    for detail, value in zip(DETAILS, appointment.details) if value is not None),
                  "END:VEVENT"]
    lines.append("END:VCALENDAR")
    return "".join(_fold(line) + "\r\n" for line in lines)


# --- Metrics (Prometheus text format 0.0.4) --------------------------------------------

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "unmatched"  # the route label of a request no route answered (404, 400...)
# Upper bounds, in seconds, of the request-duration histogram's buckets.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
# The numbers of a route and method's histogram: each bucket's count, the count above
# them, and the seconds.
_HISTOGRAM = len(DURATION_BUCKETS) + 2
Sample = Tuple[str, str, str, Union[int, float]]  # name, type, help text, value
Series = Tuple[str, str, int]  # route template, method, status


def _label(value: str) -> str:
    """A label value, escaped as the text format asks (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class SeriesLayout:
    """Where each series' numbers lie in a process's list of them: a counter for
    each (route, method, status) of series, in order, then a histogram
    (_HISTOGRAM numbers) for each (route, method) among them. Every process of a
    service declares the same series, so their lists add up number by number;
    one that meets a series none declared lays it out after them, and a process
    reading its numbers moves them into its own layout (moved()). A layout is
    known by its digest, and rendered from a text made once (render())."""

    def __init__(self, series):
        # int(): before Python 3.11, str() of an HTTPStatus is its name
        self.series: Tuple[Series, ...] = tuple(dict.fromkeys(
            (route, method, int(status)) for route, method, status in series))
        self.pairs = tuple(dict.fromkeys((route, method) for route, method, _ in self.series))
        self.counter = {key: n for n, key in enumerate(self.series)}
        self.histogram = {pair: len(self.series) + n * _HISTOGRAM
                          for n, pair in enumerate(self.pairs)}
        self.size = len(self.series) + len(self.pairs) * _HISTOGRAM
        self.keys = json.dumps(self.series, separators=(",", ":")).encode()
        self.digest = int.from_bytes(hashlib.sha1(self.keys).digest()[:8], "little")
        self._chunks: Optional[List[Tuple[int, int, str, bool]]] = None  # made at the first
        self._rendered: List[Tuple[Optional[List[float]], str]] = []  # render(), as its last

    def moved(self, numbers, into: "SeriesLayout") -> List[float]:
        """numbers, laid out here, as into lays them out (into has every series of this)."""
        moved = [0.0] * into.size
        for key, n in self.counter.items():
            moved[into.counter[key]] = numbers[n]
        for pair, base in self.histogram.items():
            to = into.histogram[pair]
            moved[to:to + _HISTOGRAM] = numbers[base:base + _HISTOGRAM]
        return moved

    def render(self, numbers: List[float]) -> str:
        """The requests counter and the duration histogram, with these numbers: a text
        made once for each run of a route and method's counters, and for each
        histogram, filled in anew only when its numbers changed since the last
        render (most stay at 0, and a scrape changes a few)."""
        chunks = self._chunks
        if chunks is None:
            chunks = self._make_chunks()
            self._rendered = [(None, "")] * len(chunks)
            self._chunks = chunks  # after _rendered: another thread may take them now
        parts, rendered = [], self._rendered
        for n, (start, end, text, histogram) in enumerate(chunks):
            values = numbers[start:end]
            last = rendered[n]
            if last[0] != values:
                if histogram:
                    cumulative = tuple(itertools.accumulate(values[:-1]))
                    last = (values, text % (*cumulative, values[-1], cumulative[-1]))
                else:
                    last = (values, text % tuple(values))
                rendered[n] = last  # one assignment: safe among threads
            parts.append(last[1])
        return "".join(parts)

    def _make_chunks(self) -> List[Tuple[int, int, str, bool]]:
        """What render() fills in: (where its numbers start and end, a text with %d
        where a count goes and %r where seconds do, whether it is a histogram); each
        family's first with its HELP and TYPE lines."""
        def labels(route: str, method: str) -> str:  # a % in them is a %, not a field
            return f'route="{_label(route)}",method="{method}"'.replace("%", "%%")

        chunks = []
        lines = ["# HELP scheduler_requests_total Requests answered, by route template, "
                 "method and status.", "# TYPE scheduler_requests_total counter"]
        for (route, method), run in itertools.groupby(enumerate(self.series),
                                                      lambda item: item[1][:2]):
            run = list(run)
            lines += [f'scheduler_requests_total{{{labels(route, method)},status="{status}"}} '
                      "%d" for _, (_, _, status) in run]
            chunks.append((run[0][0], run[-1][0] + 1, "\n".join(lines) + "\n", False))
            lines = []
        lines = ["# HELP scheduler_request_duration_seconds Time from a request's head read "
                 "to its response ready to send.",
                 "# TYPE scheduler_request_duration_seconds histogram"]
        for route, method in self.pairs:
            pair = labels(route, method)
            lines += [f'scheduler_request_duration_seconds_bucket{{{pair},le="{bound!r}"}} %d'
                      for bound in DURATION_BUCKETS]
            lines += [f'scheduler_request_duration_seconds_bucket{{{pair},le="+Inf"}} %d',
                      f"scheduler_request_duration_seconds_sum{{{pair}}} %r",
                      f"scheduler_request_duration_seconds_count{{{pair}}} %d"]
            base = self.histogram[route, method]
            chunks.append((base, base + _HISTOGRAM, "\n".join(lines) + "\n", True))
            lines = []
        return chunks


class Reading(NamedTuple):
    """A worker's numbers as the table holds them: the generation they were published
    in, their layout, the numbers, and the samples ({name: [type, help text, value]})."""

    generation: int
    layout: SeriesLayout
    numbers: Union[List[float], "array.array"]
    samples: dict
    note: object = None  # what else the writer said (the supervisor: the failing workers)


class Metrics:
    """What /metrics shows: each request counted by route template (never its raw
    path: user IDs would make a series each), method and status, with a histogram
    of durations; what the process collectors sample of this process (connections,
    the log, the store's samples()), summed over the workers with --workers; and what the collectors
    sample of the whole service (stored appointments), once.

    Every series a request can make is there from the start, at 0, so that
    Prometheus's rate() and increase() see the first burst after a restart: series
    gives them (request_series(), in the appendix), asked for at the first count;
    one not among them is added when first counted.

    observe() is on every request's path, so it only appends to a deque (atomic,
    no lock); the observations are folded into the counts when scraped, or by the
    request that finds FOLD_AT waiting: taking a lock and updating a dict would
    slow down every request, to spare the rare scrape. A scrape renders a text made
    once (SeriesLayout.render()), and with --workers adds up the other workers'
    numbers once for all the scrapes until one of them publishes anew.
    """

    FOLD_AT = 1024  # observations waiting at most before a request folds them in

    def __init__(self, series: Callable[[], Tuple[Series, ...]] = tuple):
        self._pending: Deque[Tuple[str, str, int, float]] = collections.deque()
        self._lock = threading.Lock()  # guards _layout and _numbers, and folding into them
        self._series = series
        self._layout: Optional[SeriesLayout] = None  # laid out at the first count
        self._numbers: List[float] = []  # this process's (and a dead predecessor's) counts
        self.collectors: List[Callable[[], List[Sample]]] = []  # the service's, as a whole
        self.process_collectors: List[Callable[[], List[Sample]]] = []  # this process's
        self.table = None  # a MetricsTable (part two) shared with the other workers, if any
        self._slot = 0
        self._supervisor_slot: Optional[int] = None  # where the supervisor tells of the workers
        self._publish_lock = threading.Lock()  # one writer of the slot at a time
        self._carried: dict = {}  # a dead predecessor's counter samples, by name
        self._others: Optional[Tuple[Tuple[int, ...], Reading]] = None  # the other slots, added

    def share(self, table, slot: int, supervisor_slot: Optional[int] = None) -> None:
        """Report through slot of table, carrying on from the counts of the worker
        process that had the slot before, if one did; supervisor_slot is where the
        supervisor tells of the workers (failing_workers())."""
        self.table, self._slot, self._supervisor_slot = table, slot, supervisor_slot
        carried = table.read(slot)
        if carried is not None:
            with self._lock:
                numbers, = self._lay_out([carried])
                self._numbers = list(map(operator.add, self._numbers, numbers))
            self._carried = {name: sample for name, sample in carried.samples.items()
                             if sample[0] == "counter"}
        self.publish()

    def publish(self) -> Optional[Tuple["SeriesLayout", List[float], dict]]:
        """Write this process's numbers to its slot, if it has one (the watchdog does,
        every TICK, and each scrape), and return them, as _own() gives them. One
        writer at a time, the numbers taken under the same hold, so that older ones
        never overwrite newer ones."""
        if self.table is None:
            return None
        with self._publish_lock:
            own = self._own()
            self.table.put(self._slot, *own)
        return own

    def failing_workers(self) -> List[dict]:
        """What the supervisor, if any, last said of the workers that keep dying
        young: [{"worker": number, "deaths": in a row, "last": how the last ended}]."""
        if self.table is None or self._supervisor_slot is None:
            return []
        reading = self.table.read(self._supervisor_slot)
        return [] if reading is None or not reading.note else reading.note

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self._pending.append((route, method, status, seconds))
        if len(self._pending) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Move the waiting observations into the counts."""
        pending = self._pending
        with self._lock:
            if self._layout is None:
                self._grow(self._series())
            counter, histogram, numbers = self._layout.counter, self._layout.histogram, \
                self._numbers
            for _ in range(len(pending)):  # only those here now: others may be appended
                route, method, status, seconds = pending.popleft()
                n = counter.get((route, method, status))
                if n is None:  # a series not declared: laid out after the others
                    self._grow(((route, method, int(status)),))
                    counter, histogram, numbers = self._layout.counter, \
                        self._layout.histogram, self._numbers
                    n = counter[route, method, status]
                numbers[n] += 1
                base = histogram[route, method]
                numbers[base + bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
                numbers[base + _HISTOGRAM - 1] += seconds

    def _grow(self, series) -> None:
        """Lay out these series too, after those laid out (under _lock)."""
        layout = SeriesLayout((self._layout.series if self._layout else ()) + tuple(series))
        self._numbers = self._layout.moved(self._numbers, layout) if self._layout \
            else [0.0] * layout.size
        self._layout = layout

    def _lay_out(self, readings: List[Reading]) -> List:
        """The readings' numbers in this process's layout, which grows to hold their
        series if need be (under _lock)."""
        if self._layout is None:
            self._grow(self._series())
        new = [key for reading in readings if reading.layout.digest != self._layout.digest
               for key in reading.layout.series if key not in self._layout.counter]
        if new:
            self._grow(new)
        return [reading.numbers if reading.layout.digest == self._layout.digest
                else reading.layout.moved(reading.numbers, self._layout) for reading in readings]

    def _own(self) -> Tuple[SeriesLayout, List[float], dict]:
        """This process's layout, numbers and samples, with what it carries on from."""
        self._fold()
        with self._lock:
            layout, numbers = self._layout, list(self._numbers)
        samples = {name: [kind, help_text, value] for collect in self.process_collectors
                   for name, kind, help_text, value in collect()}
        for name, (kind, help_text, value) in self._carried.items():
            samples[name] = [kind, help_text, samples.get(name, (0, 0, 0))[2] + value]
        return layout, numbers, samples

    def _other_workers(self) -> Optional[Reading]:
        """The other slots' numbers added up, in this process's layout, and their
        samples: read again only when one of them has published since."""
        table = self.table
        slots = [slot for slot in range(table.slots) if slot != self._slot]
        known = self._others
        if known is not None and known[1].layout is self._layout \
                and known[0] == tuple(map(table.generation, slots)):
            return known[1]
        read = [table.read(slot) for slot in slots]
        readings = [reading for reading in read if reading is not None]
        with self._lock:
            laid_out = self._lay_out(readings)
            layout = self._layout
        numbers = [0.0] * layout.size
        for theirs in laid_out:
            numbers = list(map(operator.add, numbers, theirs))
        samples: dict = {}
        for reading in readings:
            for name, (kind, help_text, value) in reading.samples.items():
                samples[name] = [kind, help_text, samples.get(name, (0, 0, 0))[2] + value]
        added = Reading(0, layout, numbers, samples)
        self._others = (tuple(0 if reading is None else reading.generation for reading in read),
                        added)
        return added

    def exposition(self) -> str:
        """Everything, in the Prometheus text exposition format, version 0.0.4: with
        a table, every worker's numbers added up (this one's first published)."""
        others = self._other_workers() if self.table is not None else None
        layout, numbers, samples = self.publish() or self._own()
        if others is not None:
            theirs = others.numbers if others.layout is layout else \
                others.layout.moved(others.numbers, layout)
            numbers = list(map(operator.add, numbers, theirs))
            for name, (kind, help_text, value) in others.samples.items():
                samples[name] = [kind, help_text, samples.get(name, (0, 0, 0))[2] + value]
        lines = [layout.render(numbers)]
        for name, kind, help_text, value in [(name, *sample) for name, sample in samples.items()
                                             ] + [sample for collect in self.collectors
                                                  for sample in collect()]:
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name} {value}\n")
        return "".join(lines)


# --- Requests and replies: HTTP's semantics, as the service applies them --------------
# What a request is to the service (RequestHead, Request) and what it answers (Reply,
# HTTPError, the one exception that becomes an error response): bodies and JSON,
# problem details (RFC 9457), entity tags and conditions (RFC 9110 section 13), CORS
# (the Fetch standard). Functions over values; none touches a socket.

JSON_TYPE = "application/json"
MERGE_PATCH_TYPE = "application/merge-patch+json"  # RFC 7396
PATCH_TYPES = (MERGE_PATCH_TYPE, JSON_TYPE)  # what PATCH takes: a merge patch, as either
PROBLEM_TYPE = "application/problem+json"
CALENDAR_TYPE = f"text/calendar; charset=utf-8; method={CALENDAR_METHOD}"
HTML_TYPE = "text/html; charset=utf-8"
SCRIPT_TYPE = "text/javascript; charset=utf-8"  # RFC 9239
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps() makes one per call
# Each status's name in RFC 9110 (section 15), for the status line and a problem's
# title: Python before 3.13 has older names for these.
REASONS = {**{status: status.phrase for status in HTTPStatus},
           HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "Content Too Large",
           HTTPStatus.REQUEST_URI_TOO_LONG: "URI Too Long",
           HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE: "Range Not Satisfiable",
           HTTPStatus.UNPROCESSABLE_ENTITY: "Unprocessable Content"}
MAX_QUERY_PARAMETERS = 100
# RFC 9110's methods (section 9) and PATCH; others get 501.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                           "CONNECT"})
CLIENT_GONE = 499  # the access log's and metrics' status of a request whose client hung


class Limits(NamedTuple):
    """What a client may take of the server; each is a command-line option."""

    max_body_bytes: int = 64 * 1024  # larger bodies get 413, unread
    request_timeout: float = 10.0  # seconds for a whole request to arrive; then 408
    idle_timeout: float = 30.0  # seconds a keep-alive connection may wait for a request
    first_byte_timeout: float = 5.0  # seconds a new connection may wait for its first byte
    max_connections: int = 256  # served at once; then the idle make room, or 503
    shutdown_timeout: float = 5.0  # seconds requests in flight get to finish at shutdown
    max_appointments: int = 500_000  # stored at most, over all users; more get 507
    max_appointments_per_user: int = MAX_APPOINTMENTS_PER_USER  # held by one; more get 409
    max_idempotency_keys: int = MAX_KEYS  # kept at most (24 hours each); then 503...
    max_idempotency_keys_per_user: int = MAX_KEYS_PER_USER  # ...and 429 past one user's


class RequestHead(NamedTuple):
    """A request's head as parse_head() reads it, before routing."""

    method: str
    path: str  # percent-encoded, as sent; match() decodes it
    query: str  # what follows the "?", as sent; parse_query() decodes it
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Dict[str, str]  # lower-case names; a repeated header's values joined by ", "

    @property
    def declares_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0"


# X-Request-ID: what ties a response to its lines in the log. A client's own (a
# proxy's, say) is kept if it is 1 to MAX_REQUEST_ID_LENGTH of these characters:
# printable ASCII but space, quotes and backslash, so that every log format shows it
# as it is; a request without one, or with any other, gets one made here (RequestIds).
MAX_REQUEST_ID_LENGTH = 200
REQUEST_ID_CHARACTERS = r"!#-&(-\[\]-~"  # a regular expression's class, as re and ECMA-262 read it
_REQUEST_ID = re.compile(f"[{REQUEST_ID_CHARACTERS}]{{1,{MAX_REQUEST_ID_LENGTH}}}")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def request_id_in_words() -> str:
    return (f"1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters but space, quotes "
            "and backslash")


class RequestIds:
    """The IDs made here for requests: UUIDs (RFC 9562) of version 8, the version of
    layouts of one's own. The first 80 bits (74 random, with the version and the
    variant) are drawn once a process, the last 48 are a counter from a random
    start: so no ID costs a system call (uuid.uuid4() reads os.urandom() for each),
    and two processes, or two runs of one, share none while their first bits
    differ. A forked child draws its own. next(count) is atomic in CPython (the
    GIL): threads take IDs with no lock."""

    def __init__(self):
        self.draw()
        os.register_at_fork(after_in_child=self.draw)

    def draw(self) -> None:
        bits = int.from_bytes(os.urandom(16), "big")
        first, middle, last = bits >> 80, bits >> 68 & 0xFFF, bits >> 54 & 0x3FFF
        self.prefix = f"{first >> 16:08x}-{first & 0xFFFF:04x}-8{middle:03x}-" \
                      f"{0x8000 | last:04x}-"
        # From 2**44 on, 12 hex digits without padding; 2**47 IDs and more before 2**48.
        self.count = itertools.count(1 << 44 | bits & (1 << 46) - 1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.count):x}"


_REQUEST_IDS = RequestIds()  # the process's: every Service takes its IDs from it


class HTTPError(Exception):
    """The one exception that becomes an error response, of any status: raised by
    routes and by the wire format, and made from domain errors by http_error().

    detail says what went wrong and how to fix it; headers go on the response
    (Allow, Retry-After); extensions are further members of the RFC 9457 problem.
    """

    def __init__(self, status: int, detail: str, *, headers: Optional[Dict[str, str]] = None,
                 **extensions):
        super().__init__(detail)
        self.status = HTTPStatus(status)
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    def problem(self, request_id: Optional[str] = None) -> dict:
        """The RFC 9457 problem details object for this error, in the response to the
        request of request_id (its X-Request-ID): as the problem's instance, a URI
        (section 3.1.5), urn:uuid: and the ID when it is a UUID; else as the
        extension member request_id."""
        problem = {"type": "about:blank",  # the status says what kind of problem it is...
                   "title": REASONS[self.status],  # ...so its name (section 4.2.1)
                   "status": int(self.status), "detail": self.detail}
        if request_id is not None:
            if _UUID.fullmatch(request_id):
                problem["instance"] = "urn:uuid:" + request_id.lower()
            else:
                problem["request_id"] = request_id
        problem.update(self.extensions)
        return problem


class Request(NamedTuple):
    """What a route gets: decoded path parameters, the query, the JSON body and the
    headers."""

    params: Dict[str, str]
    query: Dict[str, List[str]]
    body: object = None  # parsed JSON; only for routes that declare body_types
    headers: Mapping[str, str] = types.MappingProxyType({})  # lower-case names
    method: str = "GET"
    target: str = ""  # the path and query, as sent
    content: bytes = b""  # the body, as sent
    client_gone: Callable[[], bool] = lambda: False  # whether the client has hung up
    request_id: str = ""  # its X-Request-ID, as the response carries it


class ClientGone(Exception):
    """The client hung up before its reply was made: nobody is left to answer. A
    route raises it rather than make a large reply for nobody."""


class Reply(NamedTuple):
    """What a route returns, for the handler to send."""

    status: HTTPStatus  # an HTTPStatus member, not a bare int
    body: object  # anything json.dumps takes; str or bytes are sent as they are; None: 204
    headers: Tuple[Tuple[str, str], ...] = ()
    media_type: str = JSON_TYPE


def content_of(body) -> Optional[bytes]:
    """A Reply's body as the bytes render_response() sends."""
    if body is None or isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else json_content(body)


def parse_query(query: str) -> Dict[str, List[str]]:
    """Decode a query string into each name's values, as urllib.parse.parse_qs
    does, but doing only what a query of this API needs, so more quickly; 400 when
    it has more than MAX_QUERY_PARAMETERS or is not percent-encoded UTF-8."""
    if not query:  # most requests have none
        return {}
    fields = [field for field in query.split("&") if field]
    if len(fields) > MAX_QUERY_PARAMETERS:
        raise HTTPError(400, f"The query string has more than {MAX_QUERY_PARAMETERS} parameters.")
    if "%" in query and LONE_PERCENT.search(query):
        raise HTTPError(400, "The query string has a '%' that is not followed by two hex "
                             "digits; send % itself as %25.")
    params: Dict[str, List[str]] = {}
    try:
        for field in fields:
            name, _, value = field.partition("=")
            params.setdefault(_unquote(name), []).append(_unquote(value))
    except UnicodeDecodeError:
        raise HTTPError(400, "The query string is not valid percent-encoded UTF-8.") from None
    return params


def _unquote(text: str) -> str:
    if "%" in text or "+" in text:
        return urllib.parse.unquote_plus(text, errors="strict")
    return text


def check_framing(request: RequestHead) -> None:
    """Refuse a request whose body's length cannot be known for certain, whatever
    its route (RFC 9112 section 6.3), before it is carried out: a Transfer-Encoding
    whose last coding is not chunked, or a Content-Length that is not one number, is
    a 400; chunked is a 411, as this server reads no chunked body. Either way the
    connection then closes (keep_alive()): where the body ends and the next request
    begins cannot be known."""
    headers = request.headers
    codings = headers.get("transfer-encoding")
    if codings is not None:
        named = [coding.strip().lower() for coding in codings.split(",") if coding.strip()]
        if named[-1:] != ["chunked"]:  # empty elements are no codings (RFC 9110 5.6.1.2)
            raise HTTPError(400, f"Transfer-Encoding {codings[:40]!r} does not end with "
                                 "chunked, so the body's length cannot be known (RFC 9112 "
                                 "section 6.3); send the body with a Content-Length header.")
        raise HTTPError(411, "Chunked request bodies are not supported; "
                             "send the body with a Content-Length header.")
    declared = headers.get("content-length")
    if declared is not None and not (declared.isdigit() and declared.isascii()):
        raise HTTPError(400, f"Content-Length must be a non-negative integer, not "
                             f"{declared[:40]!r}.")


def body_length(request: RequestHead, limit: int, media_types: Tuple[str, ...]) -> int:
    """The length of the JSON body a request declares, checked before a byte of
    it is read: its framing first (411, 400: check_framing()), then its Content-Type,
    one of media_types (415), and its size (413)."""
    check_framing(request)  # a body whose end cannot be known is refused whatever it is
    headers = request.headers
    media_type = headers.get("content-type", "")
    if media_type not in media_types:  # "application/json; charset=utf-8", say: its type alone
        media_type = media_type.split(";")[0].strip().lower()
    if media_type not in media_types:
        label = media_types[0]
        others = "".join(f" (or {other})" for other in media_types[1:])
        raise HTTPError(415, f"Send the body as JSON with the header 'Content-Type: {label}'"
                             f"{others} (curl: -H 'Content-Type: {label}'); got "
                             f"{media_type or 'no Content-Type'}.",
                        # a PATCH says which patch formats it takes (RFC 5789 section 2.2)
                        headers={"Accept-Patch": ", ".join(media_types)}
                        if request.method == "PATCH" else None)
    declared = headers.get("content-length")
    if declared is None:
        raise HTTPError(411, "A request body needs a Content-Length header.")
    digits = declared.lstrip("0") or "0"
    # A number with more digits than the limit is over it, however many there are:
    # int() is not asked to read them (it refuses over 4,300, from Python 3.11 on).
    if len(digits) > len(str(limit)) or int(digits) > limit:
        size = digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"
        raise HTTPError(413, f"The body is {size} bytes; the limit is {limit}.")
    return int(digits)


def _object_without_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise HTTPError(400, f"The JSON body has the key {key!r} more than once.")
        obj[key] = value
    return obj


def _reject_constant(name):
    raise HTTPError(400, f"The JSON body contains {name}, which is not valid JSON.")


_JSON_SPACE = " \t\n\r"  # what may come before and after a JSON value (RFC 8259 section 2)
# Built once: json.loads() with these arguments builds a decoder per call.
_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicate_keys,
                                 parse_constant=_reject_constant,
                                 parse_float=decimal.Decimal)  # exact: 1e2 is the integer 100


def decode_json(raw: bytes) -> object:
    """Parse a request body as strict JSON; 400 saying what is wrong with it.

    Beyond what json accepts, rejects NaN/Infinity, duplicate keys and non-UTF-8
    bytes, which different parsers read differently.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "The request body is not valid UTF-8.") from None
    try:
        # JSONDecoder.decode(), but with the whitespace around the value skipped by
        # str methods, not by a regular expression on each side: the same value and
        # errors, at the same positions.
        value, end = _JSON_DECODER.raw_decode(text, len(text) - len(text.lstrip(_JSON_SPACE)))
        if end != len(text) and text[end:].strip(_JSON_SPACE):
            raise json.JSONDecodeError("Extra data", text,
                                       len(text) - len(text[end:].lstrip(_JSON_SPACE)))
        return value
    except json.JSONDecodeError as error:
        raise HTTPError(400, f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise HTTPError(400, "The request body is nested too deeply.") from None
    except ValueError:  # an integer past Python's limit on digits (sys.get_int_max_str_digits)
        raise HTTPError(400, "The request body has a number with too many digits to "
                             f"read; user IDs have at most {MAX_USER_ID_LENGTH}.") from None
    except decimal.InvalidOperation:  # an exponent past what Decimal can hold, as 1e-10**21
        raise HTTPError(400, "The request body has a number whose exponent is too large "
                             "to read.") from None


def example_booking() -> dict:
    """A booking's fields, for examples (its time is example_time())."""
    return {"user_id": "alice", "date": "2026-11-25", "time": example_time()}


def not_an_object() -> HTTPError:
    """What a booking whose body is not a JSON object gets."""
    return HTTPError(400, f"The request body must be a JSON object, e.g. "
                          f"{json.dumps(example_booking())}.")


# Idempotency-Key (draft-ietf-httpapi-idempotency-key-header-07, section 2.1): an
# RFC 8941 string (section 3.3.3): printable ASCII in double quotes, \" and \\ escaped.
_SF_STRING = re.compile(r'"((?:[ !#-\[\]-~]|\\[\\"])*)"')
MAX_KEY_LENGTH = 255


def idempotency_key(headers: Mapping[str, str]) -> Optional[str]:
    """The request's Idempotency-Key, unquoted; None without one; 400 for anything
    but one string of 1 to MAX_KEY_LENGTH characters."""
    value = headers.get("idempotency-key")
    if value is None:
        return None
    found = _SF_STRING.fullmatch(value)
    key = None if found is None else re.sub(r"\\(.)", r"\1", found.group(1))
    if key is None or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise HTTPError(400, "Idempotency-Key must be one quoted string (RFC 8941) of 1 to "
                             f"{MAX_KEY_LENGTH} printable ASCII characters, such as "
                             f'"8e03978e-40d5-43e8-bc93-6894a57f9324"; got {value!r}.')
    return key


_TAGS: Dict[bytes, str] = {}  # recent contents, each with its strong entity tag
_TAGS_KEPT_BYTES = 2 << 20  # of contents kept, at most; then it starts again...
_TAG_KEPT_LENGTH = 32 << 10  # ...each at most this long (a longer one is hashed each time)
_tags_kept_bytes = 0  # counted without a lock: two threads at once may count only one


def entity_tag(content: bytes, weak: bool = False) -> str:
    """An entity tag (RFC 9110 section 8.8.3) for content: its SHA-1 (for the spread
    of its bits, not for security), so it changes exactly when the content does,
    in every process and after restarts. Weak (W/) for content that means the same
    with bytes that differ (section 8.8.1): the calendar feed and its DTSTAMP.

    The tags of recent contents are kept with the contents themselves: a listing
    polled again is found by its bytes (Python's own hash of them, then a compare,
    which is cheaper than SHA-1) and not hashed again."""
    global _tags_kept_bytes
    tag = _TAGS.get(content)
    if tag is None:
        tag = f'"{hashlib.sha1(content, usedforsecurity=False).hexdigest()}"'
        if len(content) <= _TAG_KEPT_LENGTH:
            if _tags_kept_bytes + len(content) > _TAGS_KEPT_BYTES:
                _TAGS.clear()
                _tags_kept_bytes = 0
            _TAGS[content] = tag
            _tags_kept_bytes += len(content)
    return "W/" + tag if weak else tag


def _hashed_tag(content: bytes) -> str:
    """entity_tag() of a content, strong, computed without keeping it: for content
    that is new each time (a booking's)."""
    return f'"{hashlib.sha1(content, usedforsecurity=False).hexdigest()}"'


def _built_once_encoder() -> Callable[[object], str]:
    """_JSON_ENCODER.encode(), but for the C encoder (_json) that it builds again on
    each call, built here once; without its check for circular references, since
    what a reply holds is built by this module and never circular."""
    make = getattr(json.encoder, "c_make_encoder", None)  # a private part of json
    try:
        encoder = make(None, _JSON_ENCODER.default, json.encoder.encode_basestring, None,
                       _JSON_ENCODER.key_separator, _JSON_ENCODER.item_separator,
                       _JSON_ENCODER.sort_keys, _JSON_ENCODER.skipkeys,
                       _JSON_ENCODER.allow_nan)
    except TypeError:  # no _json accelerator (None), or one that takes other arguments
        return _JSON_ENCODER.encode
    return lambda body: "".join(encoder(body, 0))


_encode_json = _built_once_encoder()
_json_text = json.encoder.encode_basestring  # what _encode_json() makes of a str


def json_content(body) -> bytes:
    """body as a JSON response's content: what render_response() sends for it."""
    return (_encode_json(body) + "\n").encode()


def tagged(content: bytes) -> Reply:
    """A 200 of JSON content, with its ETag."""
    return Reply(HTTPStatus.OK, content, (("ETag", entity_tag(content)),))


def tagged_json(body: dict) -> Reply:
    """A 200 of body as JSON, with its ETag: encoded here, once, to be hashed and sent."""
    return tagged(json_content(body))


def appointment_tag(appointment: Appointment) -> str:
    """The ETag of the appointment as a GET of its URL sends it."""
    return entity_tag(json_content(appointment.as_json()))


# RFC 9110 section 8.8.3: an entity tag; If-Match and If-None-Match are
# lists of them, or * (sections 13.1.1, 13.1.2). A recipient ignores a list's empty
# elements (section 5.6.1.2): "a", , "b" and "a", are lists of two tags and one,
# and an empty value or "," a list of none. Written so that no text can be read two
# ways (two tags have a comma between them; spaces and commas before, after and
# among the commas are skipped), which keeps a long value from costing time.
_ENTITY_TAG = r'(?:W/)?"[!#-~\x80-\xff]*"'
ENTITY_TAG_LIST = rf"[ \t,]*(?:{_ENTITY_TAG}(?:[ \t]*,[ \t,]*{_ENTITY_TAG})*[ \t,]*)?"
_ENTITY_TAG_LIST = re.compile(ENTITY_TAG_LIST)
_ENTITY_TAGS = re.compile(_ENTITY_TAG)


def _opaque(tag: str) -> str:
    """The tag without its weakness: what weak comparison compares (section 8.8.3.2)."""
    return tag[2:] if tag.startswith("W/") else tag


def _tag_test(value: str, name: str, strong: bool) -> Callable[[str], bool]:
    """Whether a tag is among those of a condition header's value: "*" holds every
    tag, a list of none holds none; strong comparison (section 8.8.3.2) never
    matches a weak tag. 400 when the value is neither "*" nor a list of entity tags."""
    if value.strip(" \t") == "*":
        return lambda tag: True
    if not _ENTITY_TAG_LIST.fullmatch(value):
        raise HTTPError(400, f'{name} must be * or a list of entity tags, as an ETag header '
                             f'gives them ("...", in double quotes); got {value!r}.')
    held = _ENTITY_TAGS.findall(value)
    if strong:
        return frozenset(tag for tag in held if not tag.startswith("W/")).__contains__
    return lambda tag: _opaque(tag) in map(_opaque, held)


def write_condition(headers: Mapping[str, str]) -> Condition:
    """What a PATCH or DELETE asks of the appointment it changes, in the order of
    RFC 9110 section 13.2.2: that If-Match has its ETag, strongly compared, or is
    "*" (13.1.1); that If-None-Match does not, weakly compared (13.1.2). None when
    it sends neither. If-Unmodified-Since is ignored: an appointment has no
    modification date to compare (13.1.4). The store tests it under the lock or in
    the transaction of the change; a condition that cannot be read is a 400, as
    ignoring it would allow the change it was sent to prevent."""
    if_match, if_none_match = headers.get("if-match"), headers.get("if-none-match")
    if if_match is None and if_none_match is None:
        return None
    matches = None if if_match is None else _tag_test(if_match, "If-Match", strong=True)
    excluded = None if if_none_match is None else _tag_test(if_none_match, "If-None-Match",
                                                             strong=False)

    def condition(current: Appointment) -> bool:
        tag = appointment_tag(current)
        return (matches is None or matches(tag)) and (excluded is None or not excluded(tag))
    return condition


def unless_matched(request: RequestHead, reply: Reply) -> Reply:
    """The reply to a GET or HEAD that sends If-Match, if its ETag is among the
    tags the header holds, strongly compared ("*" holds for any reply, with an ETag
    or without one); else HTTPError 412, with the ETag the reply has now. An origin
    server evaluates If-Match before any method, a read too (RFC 9110 section
    13.1.1; section 13.2.2, step 1). Writes have theirs tested in the store
    (write_condition()); a reply that is not a 2xx ignores it (13.2.1). A value that
    is neither "*" nor entity tags holds no tag that is current: 412, saying so,
    where a write, which must not go ahead, gets a 400."""
    condition = request.headers.get("if-match")
    if condition is None or request.method not in ("GET", "HEAD") \
            or not 200 <= reply.status < 300 or condition.strip(" \t") == "*":
        return reply
    tag, unread = dict(reply.headers).get("ETag"), ""
    try:
        matches = _tag_test(condition, "If-Match", strong=True)
    except HTTPError:  # not entity tags: none of them is the current one
        matches, unread = None, " (its value is neither * nor a list of entity tags)"
    if matches is not None and tag is not None and matches(tag):
        return reply
    raise HTTPError(412, f"The representation does not meet If-Match{unread}: "
                         + (f"its ETag is now {tag}." if tag else "it has no ETag."),
                    headers={"ETag": tag} if tag else None)


def not_modified(request: RequestHead, reply: Reply) -> Reply:
    """The reply, or 304 Not Modified when it is a 200 to a GET or HEAD whose ETag
    the request's If-None-Match already has (RFC 9110 section 13.1.2: weak
    comparison; "*" matches any). Other statuses ignore the condition (13.2.1)."""
    condition = request.headers.get("if-none-match")
    if condition is None or reply.status != HTTPStatus.OK or request.method not in ("GET", "HEAD"):
        return reply
    tag = dict(reply.headers).get("ETag")
    if tag is None:
        return reply
    held = _ENTITY_TAGS.findall(condition) if _ENTITY_TAG_LIST.fullmatch(condition) else []
    if condition.strip(" \t") != "*" and _opaque(tag) not in map(_opaque, held):
        return reply  # no match, or not a list of entity tags: answered as if absent
    # Only the fields a 200 would have had that describe it (section 15.4.5): no content.
    return Reply(HTTPStatus.NOT_MODIFIED, None,
                 tuple((name, value) for name, value in reply.headers
                       if name in ("ETag", "Content-Location", "Vary")))


# Content negotiation (RFC 9110 section 12.5.1): an Accept header is a list of media
# ranges (type/subtype, type/* or */*), each with parameters, then perhaps a weight
# (q=, from 0 to 1, three decimals at most), then extensions, which are ignored.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_ACCEPT_ELEMENTS = re.compile(rf'(?:[^,"]|{_QUOTED})+')
_ACCEPT_PARTS = re.compile(rf'(?:[^;"]|{_QUOTED})+')
_WEIGHT = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_MEDIA_TYPE = re.compile(r"([-!#$%&'*+.^_`|~0-9a-z]+)/([-!#$%&'*+.^_`|~0-9a-z]+)")


def _media_type(text: str) -> Optional[Tuple[str, str, Dict[str, str]]]:
    """A media type or range's type, subtype and parameters (its weight among
    them, as "q"), all in lower case: the one parameter compared, charset, is
    read without regard to case. None when it cannot be read."""
    parts = [part.strip(" \t") for part in _ACCEPT_PARTS.findall(text.lower())]
    found = _MEDIA_TYPE.fullmatch(parts[0]) if parts else None
    if found is None or (found.group(1) == "*" and found.group(2) != "*"):
        return None
    parameters = {}
    for part in parts[1:]:
        name, equals, value = part.partition("=")
        if not equals:
            return None
        parameters.setdefault(name.strip(" \t"), value.strip(" \t").strip('"'))
    return found.group(1), found.group(2), parameters


def negotiate(accept: Optional[str], offered: Tuple[str, ...]) -> Optional[str]:
    """Which of the offered media types (the server's preference first) a request's
    Accept header prefers, or None for none of them. Each offered type gets the
    weight of the most specific range that it falls in (type/subtype with the most
    parameters, then type/subtype, then type/*, then */*; a range with parameters
    holds only a type that has them); of the weights above 0, the highest wins, the
    first offered of equals. Without Accept, or with none of its ranges readable
    (they are skipped), any type is acceptable: the first."""
    ranges = []  # (specificity, weight, type, subtype, parameters)
    for element in _ACCEPT_ELEMENTS.findall(accept or ""):
        read = _media_type(element)
        if read is None:
            continue
        kind, subtype, parameters = read
        names = list(parameters)
        weight = parameters.get("q", "1")
        if not _WEIGHT.fullmatch(weight):
            continue
        if "q" in parameters:  # what follows the weight are extensions
            parameters = {name: parameters[name] for name in names[:names.index("q")]}
        specificity = 0 if kind == "*" else 1 if subtype == "*" else 2 + len(parameters)
        ranges.append((specificity, float(weight), kind, subtype, parameters))
    if not ranges:
        return offered[0] if offered else None
    best, best_weight = None, 0.0
    for media_type in offered:
        kind, subtype, parameters = _media_type(media_type)
        held = [(specificity, weight) for specificity, weight, want, want_sub, want_parameters
                in ranges if want in ("*", kind) and want_sub in ("*", subtype)
                and want_parameters.items() <= parameters.items()]
        weight = max(held)[1] if held else 0.0
        if weight > best_weight:
            best, best_weight = media_type, weight
    return best


def http_error(error: BaseException) -> HTTPError:
    """The HTTPError for whatever a request raised: here, and only here, the
    domain's outcomes become sentences and JSON for the client. Anything
    unforeseen is a 500 that reveals nothing (the handler logs the traceback)."""
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, InvalidAppointment):
        fields = ", ".join(field for field, _ in error.errors)
        noun = "field is" if len(error.errors) == 1 else "fields are"
        verb = "moved" if error.moving else "booked"
        return HTTPError(422, f"The appointment was not {verb}: {len(error.errors)} {noun} "
                              f"invalid ({fields}).",
                         errors=[{"field": field, "message": message}
                                 for field, message in error.errors])
    if isinstance(error, AlreadyBooked):
        existing = error.existing
        return HTTPError(409, f"User {existing.user_id} already has an appointment on "
                              f"{existing.date.isoformat()}, at {existing.start:%H:%M}; a user "
                              "may book one appointment per date.",
                         appointment=existing.as_json())
    if isinstance(error, NotBooked):
        return HTTPError(404, f"User {error.user_id} has no appointment on "
                              f"{error.date.isoformat()}.")
    if isinstance(error, ConditionFailed):
        tag = appointment_tag(error.current)
        return HTTPError(412, f"The appointment does not meet If-Match (or If-None-Match): its "
                              f"ETag is now {tag}. Nothing was changed; GET it, and retry with "
                              "the ETag you get.",
                         headers={"ETag": tag}, appointment=error.current.as_json())
    if isinstance(error, StoreFull) and error.user_id is not None:
        return HTTPError(409, f"User {error.user_id} holds {error.capacity} appointments, the "
                              "most one user may; cancel one (past ones count too) to book "
                              "another.")
    if isinstance(error, StoreFull):
        return HTTPError(507, f"The service holds its maximum of {error.capacity} appointments "
                              "and can book no more until some are cancelled; tell its "
                              "operator (the limit is --max-appointments).")
    if isinstance(error, KeysFull) and error.user_id is not None:
        return HTTPError(429, f"User {error.user_id} has made {error.limit} changes with an "
                              "Idempotency-Key in the last 24 hours, the most one user may; "
                              f"retry in {error.retry_after} seconds, or without the key.",
                         headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, KeysFull):
        return HTTPError(503, f"The service keeps its maximum of {error.limit} Idempotency-Keys, "
                              "each protecting a change made in the last 24 hours; retry in "
                              f"{error.retry_after} seconds, or without the key.",
                         headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, StoreUnavailable):
        return HTTPError(503, str(error), headers={} if error.retry_after is None
                         else {"Retry-After": str(error.retry_after)})
    return HTTPError(500, "The server hit an unexpected error and logged it; please try again.")


def error_reply(error: BaseException, request_id: Optional[str] = None) -> Reply:
    """How every error becomes a response: an RFC 9457 problem (HTTPError.problem())."""
    error = http_error(error)
    return Reply(error.status, error.problem(request_id), tuple(error.headers.items()),
                 PROBLEM_TYPE)


# CORS (the Fetch standard): the request headers a browser may send and the response
# headers its scripts may read, beyond the safelisted ones; how long a browser may
# keep a preflight's answer (Chromium keeps it 2 hours at most).
CORS_ALLOW_HEADERS = "Content-Type, If-None-Match, If-Match, Idempotency-Key, X-Request-ID"
# Allow (sent with a 405) and Accept-Patch (with a 415) say what to send instead.
CORS_EXPOSE_HEADERS = ("Location, Content-Location, ETag, Retry-After, Idempotent-Replayed, "
                       "X-Request-ID, Allow, Accept-Patch")
CORS_MAX_AGE = 7200
CORS_PREFLIGHT_HEADERS = ("Allow", "Access-Control-Allow-Origin", "Access-Control-Allow-Methods",
                          "Access-Control-Allow-Headers", "Access-Control-Max-Age")


def cors_headers(origins: frozenset, origin: Optional[str], preflight: bool,
                 reply: Reply) -> Tuple[Tuple[str, str], ...]:
    """The CORS headers for a reply, when origins allows the request's Origin
    ("*" allows every one): to a preflight (an OPTIONS with
    Access-Control-Request-Method), what it may send; to any other request, errors
    included, that its script may read the reply. An origin not allowed gets none,
    and the browser withholds the reply; the status is the same either way. Vary:
    Origin on every reply, since whether these are there depends on it."""
    if origin is None or not (origin in origins or "*" in origins):
        return (("Vary", "Origin"),)
    allowed = (("Access-Control-Allow-Origin", origin if origin in origins else "*"),
               ("Vary", "Origin"))
    if preflight and reply.status == HTTPStatus.NO_CONTENT:
        return allowed + (("Access-Control-Allow-Methods", dict(reply.headers).get("Allow", "")),
                          ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                          ("Access-Control-Max-Age", str(CORS_MAX_AGE)))
    return allowed + (("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS),)


class Route(NamedTuple):
    """One entry of the route table: plain data, matched by match()."""

    method: str
    path: str  # literal segments, or {name} to capture one decoded segment
    handler: Callable  # handler(service, request): a Reply
    body_types: Tuple[str, ...] = ()  # the media types of the JSON body it reads, if any
    client_may_go: bool = False  # whether it may find its client gone (CLIENT_GONE)


# The route table: each route function adds itself with @route() where it is defined
# (Routes, below), as bottle's and Flask's do; Service.begin() looks a request up in it.
ROUTES: List[Route] = []


def route(method: str, path: str, body_types: Tuple[str, ...] = (),
          client_may_go: bool = False) -> Callable[[Callable], Callable]:
    """A decorator: add the function to ROUTES as method's handler for path."""
    def add(handler: Callable) -> Callable:
        ROUTES.append(Route(method, path, handler, body_types, client_may_go))
        return handler
    return add


@functools.lru_cache(maxsize=None)
def _pattern(path: str) -> Tuple[Tuple[str, Optional[str]], ...]:
    """A route's path as its segments, each with the name of the parameter it
    captures ({name}), or None for a literal segment."""
    return tuple((segment, segment[1:-1] if segment.startswith("{") and segment.endswith("}")
                  else None) for segment in path.split("/"))


def _match_segments(pattern: Tuple[Tuple[str, Optional[str]], ...],
                    segments: List[str]) -> Optional[Dict[str, str]]:
    """The captured parameters if segments (as many as the pattern's) fit the
    pattern, else None."""
    params = {}
    for (want, name), have in zip(pattern, segments):
        if name is not None:
            params[name] = have
        elif want != have:
            return None
    return params


def _allow(methods: List[str]) -> str:
    """The Allow header for a resource with these routes' methods: HEAD goes with
    GET, and OPTIONS with every resource."""
    allowed = [name for method in methods for name in ([method, "HEAD"] if method == "GET"
                                                       else [method])]
    return ", ".join(dict.fromkeys(allowed + ["OPTIONS"]))


def _options(allow: str, path: str) -> Route:
    """The answer to OPTIONS: which methods the target takes (RFC 9110 section 9.3.7),
    and, where one is PATCH, which patch formats (Accept-Patch: RFC 5789 section 3.1)."""
    headers = (("Allow", allow),)
    if "PATCH" in allow.split(", "):
        headers += (("Accept-Patch", ", ".join(PATCH_TYPES)),)
    return Route("OPTIONS", path, lambda service, request: Reply(HTTPStatus.NO_CONTENT, None,
                                                                 headers))


def match(routes, method: str, path: str) -> Tuple[Route, Dict[str, str]]:
    """Find the route for a request's path (its query already split off); return
    it with its decoded path parameters.

    Raises a 404 HTTPError for an unknown path and a 405, with the allowed methods,
    for a known path and another method. HEAD is served as GET. OPTIONS is
    answered for every known path, and for "*" (the server as a whole); for an
    unknown path it is a 404, as any other method is.
    """
    if path == "*" or (method == "CONNECT" and not path.startswith("/")):
        allow = _allow([route.method for route in routes])  # what the server takes
        if method == "OPTIONS":
            return _options(allow, "*"), {}
        raise HTTPError(405, f"{method} {path} is not supported: this server is not a "
                             f"proxy; use {allow} on its paths.", headers={"Allow": allow})
    segments = path.split("/")  # the raw path first, so an encoded "/" stays in its segment
    if "%" in path:  # else there is nothing to decode
        if LONE_PERCENT.search(path):
            raise HTTPError(400, "The path has a '%' that is not followed by two hex digits; "
                                 "send % itself as %25.")
        try:
            segments = [urllib.parse.unquote(s, errors="strict") for s in segments]
        except UnicodeDecodeError:
            raise HTTPError(400, "The path is not valid percent-encoded UTF-8.") from None
    methods, template, count = [], "", len(segments)
    for route in routes:
        pattern = _pattern(route.path)
        params = _match_segments(pattern, segments) if len(pattern) == count else None
        if params is None:
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route, params
        methods.append(route.method)
        template = route.path
    if not methods:
        raise HTTPError(404, f"There is no resource at {path}; /docs lists the API's paths.")
    allow = _allow(methods)
    if method == "OPTIONS":
        return _options(allow, template), {}
    raise HTTPError(405, f"{method} is not supported here; use {allow}.", headers={"Allow": allow})


# --- Pages: what a browser is shown ---------------------------------------------------
# The root page, and an API reference at /docs: a page and its script (/docs.js) that
# render the API description (/openapi.json) in the browser, with a form for each
# operation that sends the real request. All of it is written here, and nothing comes
# from anywhere else: their Content-Security-Policy lets them use only the style
# sheet below (by its hash) and that script, and talk to this server alone.

# The root page's links, by name (as its JSON gives them), each with what it is.
HOME_LINKS = (("docs", "/docs", "the API reference, with a form to try each operation"),
              ("openapi", "/openapi.json", "the API description (OpenAPI 3.1)"),
              ("health", "/healthz", "whether bookings can be taken now"),
              ("metrics", "/metrics", "counters for Prometheus"))
HOME_TYPES = (HTML_TYPE, JSON_TYPE)  # what GET / is sent as, by Accept; HTML by default
HOME_TYPE_NAMES = tuple(media_type.split(";")[0] for media_type in HOME_TYPES)  # for words

PAGE_STYLE = """
:root { color-scheme: light dark; --accent: #2f62b5; --muted: #777; --line: #8886; }
body { font: 16px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 0 auto;
       padding: 1rem 1.5rem 4rem; }
a { color: var(--accent); }
code, pre, input, textarea { font: 14px/1.4 ui-monospace, monospace; }
h1 small, h3 small, label small { color: var(--muted); font-weight: normal; }
nav { display: flex; gap: 1.5rem; }
.operation { border-top: 1px solid var(--line); padding: .5rem 0 1rem; }
.operation h3 { margin: .5rem 0 0; }
.method { display: inline-block; min-width: 4.5em; margin-right: .5em; border-radius: 4px;
          color: #fff; background: #666; text-align: center; font-size: 80%; }
.get { background: #2d7d46; } .post { background: #2f62b5; }
.patch { background: #9a6200; } .delete { background: #b3261e; }
form { display: grid; gap: .4rem; }
label { display: grid; grid-template-columns: 12rem 1fr; gap: 0 .75rem; align-items: baseline; }
label .hint { grid-column: 2; }
.row { display: flex; gap: .5rem; }
.row input { flex: 1; }
textarea { width: 100%; box-sizing: border-box; }
button { justify-self: start; padding: .2rem 1.2rem; }
.reply { margin-top: .75rem; padding-left: .75rem; border-left: 4px solid var(--line); }
.reply.ok { border-color: #2d7d46; } .reply.failed, .failed { border-color: #b3261e; }
pre { margin: .25rem 0; white-space: pre-wrap; overflow-wrap: anywhere; }
"""
_STYLE_SOURCE = base64.b64encode(hashlib.sha256(PAGE_STYLE.encode()).digest()).decode()
# What the pages may do: use the style sheet above (by its hash); on /docs, run its
# script (and that script may make no markup of text: Trusted Types) and send requests
# to this server. Nothing else: no inline script, no frames, no other origin.
HOME_POLICY = (f"default-src 'none'; style-src 'sha256-{_STYLE_SOURCE}'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
DOCS_POLICY = (HOME_POLICY + "; script-src 'self'; connect-src 'self'; "
               "require-trusted-types-for 'script'")
# Sent with the pages and the script, besides their policy.
PAGE_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                ("Referrer-Policy", "no-referrer"))
_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})


def _html_page(title: str, head: str, body: str) -> str:
    """An HTML document with the style sheet; title is text, head and body markup."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title.translate(_HTML_ESCAPES)}</title>\n<style>{PAGE_STYLE}</style>\n"
            f"{head}</head>\n<body>\n{body}</body>\n</html>\n")


def home_json() -> dict:
    """GET / as JSON: the service's name and version, and its links by name (each a
    URL relative to the service's, so right behind any proxy)."""
    return {"name": SERVICE_TITLE, "version": __version__,
            "links": {name: url for name, url, _ in HOME_LINKS}}


def home_page() -> str:
    """GET / as HTML: the same as home_json(), for a person."""
    links = "".join(f'<li><a href="{url}">{url}</a>: {about}</li>\n'
                    for _, url, about in HOME_LINKS)
    return _html_page(f"{SERVICE_TITLE} {__version__}", "", (
        f"<main>\n<h1>{SERVICE_TITLE.translate(_HTML_ESCAPES)} "
        f"<small>{__version__.translate(_HTML_ESCAPES)}</small></h1>\n"
        "<p>Book appointments with practitioners over HTTP and JSON.</p>\n"
        f"<ul>\n{links}</ul>\n"
        "<p>This page as JSON: <code>curl -H 'Accept: application/json' ...</code></p>\n"
        "</main>\n"))


DOCS_PAGE = _html_page("API reference", '<script src="/docs.js" defer></script>\n', """\
<nav><a href="/">Home</a> <a href="/openapi.json">/openapi.json</a></nav>
<main id="api"><p id="loading">Reading the API description, /openapi.json (this page needs
JavaScript)...</p></main>
""")

DOCS_SCRIPT = r"""// The API reference at /docs: the service's own description (/openapi.json) as a
// page, with a form for each operation that sends the real request and shows the
// status, headers and body that came back. No library; nothing is fetched but from
// this server. /docs?try=USER also drives the forms once, as a person would, as
// user USER, and lists what each reply showed (the tests' way in): see tryForms().
"use strict";

let api = {};  // the description, once read

// An element with attributes and children; a string child is text, never markup.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== undefined));
  return node;
}

// What a reference ({"$ref": "#/components/..."}) points to; anything else, itself.
function resolve(node) {
  while (node && node.$ref) {
    node = node.$ref.slice(2).split("/").reduce((at, key) => at[key], api);
  }
  return node;
}

// A new Idempotency-Key: 128 random bits, written as the quoted string it must be.
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return '"' + Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("") + '"';
}

// A labelled input: a parameter's (where: path, query or header) or a field of the
// JSON body (where: body), holding value (an example) if there is one.
function input(name, where, about, value, required) {
  const box = el("input", {name, "data-in": where, autocomplete: "off", spellcheck: "false",
                           value: value === undefined ? undefined : String(value),
                           // a path left without a segment is another path: not sent
                           required: where === "path" && required ? "" : undefined});
  const row = el("span", {class: "row"}, box);
  if (name === "Idempotency-Key") {
    const button = el("button", {type: "button"}, "New key");
    button.addEventListener("click", () => { box.value = newKey(); });
    row.append(button);
  }
  return el("label", {}, el("span", {}, el("code", {}, name),
                            el("small", {}, (where === "body" ? "" : " " + where)
                                             + (required ? " (required)" : ""))),
            row, about ? el("small", {class: "hint"}, about) : undefined);
}

// The JSON body that a form's fields make: those left empty are left out.
function bodyOf(form) {
  const body = {};
  for (const box of form.querySelectorAll('[data-in="body"]')) {
    if (box.value !== "") body[box.name] = box.value;
  }
  return JSON.stringify(body, null, 1);
}

// Send what a form says, and show the status, headers and body that came back.
async function send(form, method, path, mediaType, reply) {
  const query = new URLSearchParams(), headers = {};
  for (const box of form.querySelectorAll("input[data-in]")) {
    if (box.value === "") continue;
    const where = box.dataset.in;
    if (where === "path") path = path.replace(`{${box.name}}`, encodeURIComponent(box.value));
    if (where === "query") query.append(box.name, box.value);
    if (where === "header") headers[box.name] = box.value;
  }
  const url = path + (query.toString() ? "?" + query : "");
  const request = {method: method.toUpperCase(), headers, cache: "no-store"};
  if (mediaType) {
    headers["Content-Type"] = mediaType;
    request.body = form.elements.body.value;
  }
  reply.replaceChildren(el("p", {}, el("code", {}, request.method + " " + url)));
  reply.hidden = false;
  try {
    const response = await fetch(url, request);
    const text = await response.text();
    let shown = text;
    if (/json/.test(response.headers.get("Content-Type"))) {
      try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (error) { }
    }
    reply.className = "reply " + (response.ok ? "ok" : "failed");
    const status = `${response.status} ${response.statusText}`;
    const lines = Array.from(response.headers, ([name, value]) => `${name}: ${value}`);
    reply.append(el("p", {class: "status"}, el("strong", {}, status)),
                 el("pre", {class: "headers"}, lines.join("\n")),
                 el("pre", {class: "body"}, shown));
  } catch (error) {
    reply.className = "reply failed";
    reply.append(el("p", {class: "status"}, "No response: " + error.message));
  }
}

// An operation: what it does, a form with a field for each of its parameters and
// body fields (filled with the description's examples), and the responses it gives.
function operation(path, method, op) {
  const form = el("form", {id: "form-" + op.operationId});
  for (const parameter of (op.parameters || []).map(resolve)) {
    form.append(input(parameter.name, parameter.in, parameter.description,
                      parameter.required ? parameter.example : undefined, parameter.required));
  }
  let mediaType;
  if (op.requestBody) {
    const [type, media] = Object.entries(op.requestBody.content)[0];
    const schema = resolve(media.schema);
    const example = (Object.values(media.examples || {})[0] || {}).value || {};
    for (const [name, property] of Object.entries(schema.properties || {})) {
      form.append(input(name, "body", resolve(property).description, example[name],
                        (schema.required || []).includes(name)));
    }
    const body = el("textarea", {name: "body", rows: 5, spellcheck: "false"});
    form.append(el("label", {}, el("span", {}, "Body ", el("small", {}, type)), body));
    form.addEventListener("input", (event) => {
      if (event.target.dataset.in === "body") body.value = bodyOf(form);
    });
    body.value = bodyOf(form);
    mediaType = type;
  }
  form.append(el("button", {type: "submit"}, "Send"));
  const reply = el("div", {class: "reply", id: "reply-" + op.operationId, hidden: ""});
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    form.sent = send(form, method, path, mediaType, reply);
  });
  const responses = el("dl");
  for (const [status, response] of Object.entries(op.responses)) {
    responses.append(el("dt", {}, status), el("dd", {}, resolve(response).description));
  }
  return el("section", {class: "operation", id: "op-" + op.operationId},
            el("h3", {}, el("span", {class: "method " + method}, method.toUpperCase()),
               el("code", {}, path), " ", el("small", {}, op.operationId)),
            el("p", {}, op.summary), form, reply,
            el("details", {}, el("summary", {}, "Responses"), responses));
}

// The whole reference: each tag's operations (HEAD and OPTIONS, which every path
// has, aside), then the schemas.
function render() {
  document.title = `${api.info.title} ${api.info.version}: API reference`;
  const main = document.getElementById("api");
  main.replaceChildren(el("h1", {}, api.info.title + " ", el("small", {}, api.info.version)),
                       el("p", {}, api.info.description));
  for (const tag of api.tags) {
    main.append(el("h2", {id: "tag-" + tag.name}, tag.name), el("p", {}, tag.description));
    for (const [path, item] of Object.entries(api.paths)) {
      for (const [method, op] of Object.entries(item)) {
        if (!["head", "options"].includes(method) && op.tags.includes(tag.name)) {
          main.append(operation(path, method, op));
        }
      }
    }
  }
  main.append(el("h2", {}, "Schemas"));
  for (const [name, schema] of Object.entries(api.components.schemas)) {
    main.append(el("details", {id: "schema-" + name}, el("summary", {}, name),
                   el("pre", {}, JSON.stringify(schema, null, 2))));
  }
}

// /docs?try=USER: fill in the forms and press Send as a person would: a booking as
// USER (at the example's date and time), USER's listing, the booking again without
// a date, then an appointment's lookup without its user. Each reply as shown is
// listed in the page (tried-1, tried-2...), or what was not sent and why, then
// whether the style sheet was applied; <html data-tried> says it is done.
async function tryForms(user) {
  const log = el("ol");
  const note = (...children) => log.append(el("li", {id: `tried-${log.children.length + 1}`},
                                              ...children));
  document.getElementById("api").prepend(el("section", {id: "tried"},
                                             el("h2", {}, "Tried as " + user), log));
  const steps = [["bookAppointment", "body", "user_id", user],
                 ["listAppointments", "query", "user_id", user],
                 ["bookAppointment", "body", "date", ""],
                 ["showAppointment", "path", "user_id", ""]];
  try {
    for (const [id, where, name, value] of steps) {
      const form = document.getElementById("form-" + id);
      const box = form.querySelector(`[data-in="${where}"][name="${name}"]`);
      box.value = value;
      box.dispatchEvent(new Event("input", {bubbles: true}));
      if (!form.checkValidity()) {  // pressing Send would show why, and send nothing
        note(`Not sent: ${name} ${box.validity.valueMissing ? "is required" : "is invalid"}`);
        continue;
      }
      form.querySelector('button[type="submit"]').click();
      await form.sent;
      const reply = document.getElementById("reply-" + id);
      note(el("pre", {}, Array.from(reply.children, (part) => part.textContent).join("\n")));
    }
    const styled = getComputedStyle(document.body).maxWidth !== "none";
    note("Style sheet " + (styled ? "applied" : "not applied"));
  } catch (error) {
    note("Failed: " + error);
  }
  document.documentElement.dataset.tried = "done";
}

// What the Content-Security-Policy blocks, shown at the top of the page.
document.addEventListener("securitypolicyviolation", (event) => {
  let list = document.getElementById("blocked");
  if (!list) {
    list = el("ul", {id: "blocked", class: "reply failed"});
    document.body.prepend(el("p", {}, "Blocked by the Content-Security-Policy:"), list);
  }
  list.append(el("li", {}, `${event.violatedDirective}: ${event.blockedURI}`));
});

(async () => {
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    api = await response.json();
  } catch (error) {
    document.getElementById("loading").textContent = "Could not read /openapi.json: " + error;
    return;
  }
  render();
  const user = new URLSearchParams(location.search).get("try");
  if (user !== null) await tryForms(user);
})();
"""


def _page_reply(content: bytes, media_type: str, headers: Tuple[Tuple[str, str], ...]) -> Reply:
    """A 200 of a page or script: its ETag, then headers."""
    return Reply(HTTPStatus.OK, content, (("ETag", entity_tag(content)),) + headers, media_type)


@functools.lru_cache(maxsize=None)
def home_reply(media_type: str) -> Reply:
    """GET /'s 200 as media_type (one of HOME_TYPES), made once a process."""
    vary = (("Vary", "Accept"),)  # as negotiated by it
    if media_type == JSON_TYPE:
        return _page_reply(json_content(home_json()), JSON_TYPE, vary)
    return _page_reply(home_page().encode(), HTML_TYPE,
                       vary + (("Content-Security-Policy", HOME_POLICY),) + PAGE_HEADERS)


@functools.lru_cache(maxsize=None)
def docs_reply(script: bool) -> Reply:
    """GET /docs's 200 (or, if script, /docs.js's), made once a process."""
    if script:
        return _page_reply(DOCS_SCRIPT.encode(), SCRIPT_TYPE, PAGE_HEADERS)
    return _page_reply(DOCS_PAGE.encode(), HTML_TYPE,
                       (("Content-Security-Policy", DOCS_POLICY),) + PAGE_HEADERS)


# --- The API description (OpenAPI 3.1) --------------------------------------------------
# Served at /openapi.json. It is built from the domain's rules, so that a rule
# changed there changes here: the schemas' patterns and words, and the examples, whose
# times are example_time() and the like, and whose outcomes are what the service makes
# of them (an appointment's as_json(), an error's http_error()). Tests hold the
# service to the examples: each request example, sent to a fresh server, must get the
# response example of the same name.

_PATH_EXAMPLES = {"user_id": "alice", "date": "2026-11-25"}
_REQUEST_ID_EXAMPLE = "5e0b3c8a-2f71-8c4d-9a1e-3b6f0d2c7a15"  # as RequestIds makes them


def _refusal(parse: Callable, *args) -> HTTPError:
    """The error the service answers when parse(*args) raises, for an example."""
    try:
        parse(*args)
    except Exception as error:
        return http_error(error)
    raise ValueError(f"{args} is valid: it makes no example of an error")


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _content(schema: dict, examples: Optional[dict] = None, media_type: str = JSON_TYPE) -> dict:
    content = {"schema": schema}
    if examples:
        content["examples"] = {name: {"value": value} for name, value in examples.items()}
    return {media_type: content}


def _reply(description: str, schema: Optional[dict] = None, examples: Optional[dict] = None,
           media_type: str = JSON_TYPE, **fields) -> dict:
    content = {"content": _content(schema, examples, media_type)} if schema else {}
    return {"description": description, **content, **fields}


def _problem(description: str, schema: str = "Problem", headers: Optional[dict] = None,
             **examples: HTTPError) -> dict:
    """A problem response; its examples are what HTTPError makes of them."""
    return _reply(description, _ref("schemas", schema),
                  {name.replace("_", "-"): error.problem(_REQUEST_ID_EXAMPLE)
                   for name, error in examples.items()},
                  PROBLEM_TYPE, **({"headers": headers} if headers else {}))


def _class_char(code: int) -> str:
    """A character inside a regular expression's [...], as Python's re and JSON
    Schema's (ECMA-262) both read it: an escape in the BMP, itself beyond."""
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


@functools.lru_cache(maxsize=None)
def _category_runs() -> Tuple[Tuple[int, int, str], ...]:
    """Every code point's category in this Python's Unicode database (the one the
    parsers consult), as runs (first, last, category). Every code point is looked
    at once, here, so that the character classes below need not each make a pass
    of their own over all of them."""
    runs, first = [], 0
    for category, group in itertools.groupby(map(unicodedata.category,
                                                 map(chr, range(sys.maxunicode + 1)))):
        last = first + sum(1 for _ in group) - 1
        runs.append((first, last, category))
        first = last + 1
    return tuple(runs)


def _char_class(ranges) -> str:
    """Code point ranges (first, last), in order, as the inside of a [...]."""
    merged: List[List[int]] = []
    for first, last in ranges:
        if merged and merged[-1][1] + 1 == first:
            merged[-1][1] = last
        else:
            merged.append([first, last])
    return "".join(_class_char(first) if first == last
                   else f"{_class_char(first)}-{_class_char(last)}" for first, last in merged)


_END = r"(?![\s\S])"  # the end of the text: "$" also matches before a final newline in re
# Beyond the BMP, ECMA-262 without its u flag matches UTF-16 code units, and with it
# code points (as Python does), and no range of such characters can be written that
# both read alike (Spectral, without the flag, could not compile the user-ID pattern).
# So one is written as not one of the few refused (each a literal, which both read
# alike), then as a surrogate pair (without u) or a code point past U+FFFF (with u).
_ASTRAL = r"(?:[\ud800-\udbff][\udc00-\udfff]|(?![\u0000-\uffff])[\s\S])"
_AFTER_ASTRAL = r"(?:(?<=[\udc00-\udfff])|(?<=(?![\u0000-\uffff])[\s\S]))"  # lookbehinds
_BEFORE_ASTRAL = r"(?:[\ud800-\udbff]|(?![\u0000-\uffff])[\s\S])"  # for a lookahead


@functools.lru_cache(maxsize=None)
def _character_classes() -> Tuple[str, str, str, str, str]:
    """What the user ID's and the note's rules are made of, as parts of regular
    expressions: a class of whitespace; a character a note allows (no control
    characters, surrogates or invisible ones); one a user ID allows (nor a
    default-ignorable one or a blank look-alike); a joiner between visible
    non-ASCII characters; a variation selector after an emoji. The last two as
    _invisible_character() allows them, but that beyond the BMP any allowed
    character stands for a visible one, and for an emoji."""
    # Listed, not excluded ([^...]): validators in Rust or JavaScript cannot name the
    # surrogates that the service refuses, and a list leaves them out by itself.
    refused = FORBIDDEN_CATEGORIES + INVISIBLE_CATEGORIES
    runs = _category_runs()
    bmp = [(first, min(last, 0xFFFF), category) for first, last, category in runs
           if first <= 0xFFFF]
    spaces = [(code, code) for first, last, category in bmp  # str.isspace's: among these
              if category in ("Zs", "Zl", "Zp", "Cc")
              for code in range(first, last + 1) if chr(code).isspace()]
    in_note = [(first, last) for first, last, category in bmp if category not in refused]
    # Past the BMP, each refused character is written out (see _ASTRAL): those of the
    # categories, and the look-alikes that are assigned (reserved ones are not).
    refused_astral = [code for first, last, category in runs
                      if last > 0xFFFF and category in refused
                      for code in range(max(first, 0x10000), last + 1)]
    look_alikes = sorted(ord(char) for char in _LOOK_ALIKES)
    astral_look_alikes = [code for code in look_alikes if code > 0xFFFF
                          and unicodedata.category(chr(code)) not in refused + ("Cn",)]

    def allowed(ranges, astral_refused) -> str:
        inner = _char_class(ranges)
        astral = "|".join(chr(code) for code in astral_refused)
        return f"(?:[{inner}]|{f'(?!{astral}){_ASTRAL}' if astral else _ASTRAL})"

    in_user_id = [(low, high) for first, last in in_note
                  for low, high in _without(first, last, look_alikes)]
    visible = _char_class((max(first, 0x80), last) for first, last, category in bmp
                          if category[0] in VISIBLE_CLASSES and last >= 0x80)  # beyond ASCII
    emoji = _char_class(sorted([(max(first, 0x80), last) for first, last, category in bmp
                                if category[0] == "S" and last >= 0x80]
                               + [(ord(char), ord(char)) for char in EMOJI_BEYOND_SYMBOLS]))
    joiner = "".join(_class_char(ord(char)) for char in JOINERS)
    selector = "".join(_class_char(ord(char)) for char in VARIATION_SELECTORS)
    keycap_bases = _char_class(sorted((ord(char), ord(char)) for char in KEYCAP_BASES))
    return (_char_class(spaces), allowed(in_note, refused_astral),
            allowed(in_user_id, sorted(refused_astral + astral_look_alikes)),
            f"(?:(?<=[{visible}])|{_AFTER_ASTRAL})[{joiner}](?=[{visible}]|{_BEFORE_ASTRAL})",
            f"(?:(?<=[{emoji}])|{_AFTER_ASTRAL})[{selector}]|(?<=[{keycap_bases}])"
            f"{_class_char(0xFE0F)}(?={_class_char(ord(KEYCAP))})")


def _without(first: int, last: int, codes: List[int]) -> List[Tuple[int, int]]:
    """The range first to last, as ranges, without the code points codes (in order)."""
    ranges = []
    for code in codes[bisect.bisect_left(codes, first):bisect.bisect_right(codes, last)]:
        if first < code:
            ranges.append((first, code - 1))
        first = code + 1
    return ranges + ([(first, last)] if first <= last else [])


def user_id_pattern() -> str:
    """parse_user_id()'s rules for a string in NFC as one regular expression: not a
    dot segment, no control characters or surrogates, no invisible characters but
    joiners between visible non-ASCII ones and variation selectors after emoji,
    and no whitespace first or last. It compiles, and matches alike, with and
    without ECMA-262's u flag. It cannot say NFC: the service normalizes first
    (README, UserId)."""
    space, _, allowed, joined, selected = _character_classes()
    dots = "|".join(re.escape(segment) for segment in DOT_SEGMENTS)
    return (f"^(?!(?:{dots}){_END})(?![{space}])(?:{allowed}|{joined}|{selected})*"
            f"(?<![{space}]){_END}")


def text_pattern(text: FreeText) -> str:
    """A FreeText rule as one regular expression: no control characters or
    surrogates, no invisible format characters but joiners between visible
    non-ASCII ones; if its lines may break, line breaks (LF, or CR LF) anywhere."""
    _, allowed, _, joined, _ = _character_classes()
    breaks = "|\\n|\\r\\n" if text.line_breaks else ""
    return f"^(?:{allowed}{breaks}|{joined})*{_END}"


def note_pattern() -> str:
    """parse_note()'s rules (NOTE) as one regular expression: text_pattern()."""
    return text_pattern(NOTE)


def _text_words(text: FreeText) -> str:
    """A FreeText rule's characters in words, for the API description."""
    lines = ("lines may break (\\n), but no other control characters" if text.line_breaks
             else "on one line: no control characters")
    return (f"kept as written (not normalized); {lines} or invisible format characters. "
            "An empty one is none")


def date_pattern() -> str:
    """parse_date()'s dates, FIRST_DATE to LAST_DATE, as a regular expression: JSON
    Schema's "format": "date" is only an annotation, which validators may skip.
    Written for whole years (FIRST_DATE a 1 January, LAST_DATE a 31 December): a
    century they hold whole is written as its two digits and any two more, its leap
    years as the pattern of those divisible by 4 (and 00 where the century is); the
    years of one held in part are listed."""
    first, last = FIRST_DATE.year, LAST_DATE.year
    if (FIRST_DATE, LAST_DATE) != (dt.date(first, 1, 1), dt.date(last, 12, 31)):
        raise ValueError("date_pattern() is written for whole years")
    month_day = ("(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
                 "|(?:0[13578]|1[02])-31)")
    centuries = []
    for century in range(first // 100, last // 100 + 1):
        years = range(max(first, century * 100), min(last, century * 100 + 99) + 1)
        leap_years = [year for year in years
                      if year % 4 == 0 and (year % 100 or year % 400 == 0)]
        if len(years) == 100:
            in_it = "[0-9]{2}"
            leap = "(?:[02468][048]|[13579][26])" if century % 4 == 0 else \
                "(?:0[48]|[2468][048]|[13579][26])"
        else:
            in_it = "(?:%s)" % "|".join(f"{year % 100:02d}" for year in years)
            leap = "(?:%s)" % "|".join(f"{year % 100:02d}" for year in leap_years)
        centuries.append(f"{century:02d}(?:{in_it}-{month_day}"
                         + (f"|{leap}-02-29)" if leap_years else ")"))
    either = centuries[0] if len(centuries) == 1 else f"(?:{'|'.join(centuries)})"
    return f"^{either}{_END}"


@functools.lru_cache(maxsize=None)
def _response_components() -> dict:
    """The responses the operations share, by name."""
    responses = {
        "BadRequest": _problem("The request cannot be parsed: a missing or malformed "
                               "parameter (from after to included), or a body that is not "
                               "valid JSON"),
        "NotFound": _problem("No such appointment or path"),
        "NotModified": {"description": "The representation is the one the client has "
                                       "(If-None-Match): no body",
                        "headers": {"ETag": _ref("headers", "ETag")}},
        "Error": _problem("Any other error: 405 (with Allow), 408, 414, 431, 500, 501, 503 "
                          "(with Retry-After)..."),
    }
    for response in responses.values():
        _with_request_id(response)
    return responses


def _camel(name: str) -> str:
    """list_appointments: listAppointments, as client generators name methods."""
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


@functools.lru_cache(maxsize=None)
def _paths() -> dict:
    """The description's operations, by path and method: what they take, and every
    response each can give (their statuses are /metrics' series: request_series())."""
    text = {"type": "string"}
    appointment = _ref("schemas", "Appointment")
    errors = {"400": _ref("responses", "BadRequest"), "default": _ref("responses", "Error")}
    by_key = {"parameters": [_ref("parameters", "UserIdPath"), _ref("parameters", "DatePath")]}
    found = {**errors, "404": _ref("responses", "NotFound")}
    conditional = {"parameters": [_ref("parameters", "IfNoneMatch")]}
    # A write's conditions (RFC 9110 section 13.1): only on what it would otherwise change.
    on_condition = {"parameters": by_key["parameters"] + [
        _ref("parameters", "IfMatch"), _ref("parameters", "IfNoneMatch"),
        _ref("parameters", "IdempotencyKey")]}
    key_reused = HTTPError(422, "This Idempotency-Key came with another request (method, URL "
                                "or body) in the last 24 hours; send a new key with a new "
                                "request.", errors=[{"field": "Idempotency-Key", "message":
                                                     "Idempotency-Key is another request's: "
                                                     "make a new one for each request"}])
    stale = {"412": _problem("The appointment does not meet If-Match or If-None-Match; "
                             "`appointment` is as it now is, nothing changed, and ETag is "
                             "its tag", "ConflictProblem",
                             headers={"ETag": _ref("headers", "ETag")})}
    tagged = {"headers": {"ETag": _ref("headers", "ETag")}}
    vary = {"description": "Accept: the representation depends on it", "schema": text}
    unchanged = {"304": _ref("responses", "NotModified")}
    # The examples, made by the domain: a booking, the appointment it books, and a move.
    book = example_booking()
    booked = parse_appointment(book)
    shown = booked.as_json()
    move = {"date": "2026-11-26", "time": f"10:{START_MINUTES[0]:02d}"}
    moved = parse_changes(move, booked.user_id).applied(booked).as_json()
    not_json = _problem("The body is not valid JSON (a syntax error, a key twice, NaN, a "
                        "number with too many digits, bytes that are not UTF-8), or not a "
                        "JSON object", not_an_object=not_an_object())
    retry_after = {"Retry-After": _ref("headers", "RetryAfter")}
    store_errors = {"429": _problem("The user has made as many changes with an "
                                    "Idempotency-Key in the last 24 hours as one user may "
                                    "(their keys of requests that changed nothing make room "
                                    "first); retry after Retry-After seconds, or without the "
                                    "key", headers=retry_after),
                    "503": _problem("The database is busy or failing, or the service keeps "
                                    "as many Idempotency-Keys as it may, each protecting a "
                                    "change made in the last 24 hours; retry after "
                                    "Retry-After seconds where it is given (a full disk or "
                                    "a damaged file has none: retrying will not fix them)",
                                    headers=retry_after),
                    "default": errors["default"]}
    paths = {
        "/appointments": {
            "get": {
                "summary": "List a user's appointments, sorted by start",
                "parameters": [_ref("parameters", name) for name in ("UserIdQuery", "From",
                                                                      "To", "IfNoneMatch")],
                "responses": {"200": _reply(
                    "The appointments (an empty list for a user with none)",
                    _ref("schemas", "AppointmentList"),
                    {"list": {"user_id": "alice", "appointments": [shown]}},
                    **tagged), **unchanged, **errors, **store_errors},
            },
            "post": {
                "summary": "Book an appointment",
                "parameters": [_ref("parameters", "IdempotencyKey")],
                "requestBody": {"required": True, "content": _content(
                    _ref("schemas", "NewAppointment"), {  # valid ones only: tools offer them
                        "book": book, "with-a-note": {**book, "note": "Left knee"}})},
                "responses": {
                    "201": _reply("Booked", appointment, {
                        "book": shown, "with-a-note": {**shown, "note": "Left knee"}},
                                  headers={"Location": {
                                      "description": "The appointment's own URL",
                                      "schema": text}, "ETag": _ref("headers", "ETag")}),
                    "400": not_json,
                    "409": _problem("The user already has an appointment that date; "
                                    "`appointment` is that one (without `appointment`: the "
                                    "user holds as many appointments as one user may, or a "
                                    "request with this Idempotency-Key is still being "
                                    "processed, with Retry-After)", "ConflictProblem",
                                    conflict=http_error(AlreadyBooked(booked))),
                    "411": _problem("No Content-Length (chunked bodies are refused)"),
                    "413": _problem("The body is larger than the server's limit"),
                    "415": _problem("The body is not labelled application/json"),
                    "422": _problem("Fields are missing or invalid; `errors` lists each (or "
                                    "the Idempotency-Key came with another request: `errors` "
                                    "names it)", "ValidationProblem", key_reused=key_reused,
                                    invalid_fields=_refusal(parse_appointment, {
                                        "user_id": "", "date": "2025-02-29",
                                        "time": example_unbookable_time()})),
                    "507": _problem("The service holds its maximum of appointments"),
                    **store_errors},
            },
        },
        "/appointments/{user_id}/{date}": {
            "get": {"summary": "One appointment: the URL in a booking's Location header",
                    "parameters": by_key["parameters"] + conditional["parameters"],
                    "responses": {"200": _reply(
                        "The appointment", appointment, {"show": shown},
                        **tagged), **unchanged, **found, **store_errors}},
            "patch": {
                "summary": "Reschedule: move the appointment to another time or date, or "
                           f"change its {' or '.join(_DETAIL_NAMES)}, in one step (a JSON "
                           "merge patch, RFC 7396, of date, time and details)",
                **on_condition,
                # One media type, with one schema, or generated clients send the first.
                "requestBody": {"required": True, "description": f"A JSON merge patch, sent "
                                f"as {MERGE_PATCH_TYPE}; as {JSON_TYPE}, it is taken too",
                                "content": _content(_ref("schemas", "AppointmentPatch"),
                                                    {"reschedule": move}, MERGE_PATCH_TYPE)},
                "responses": {
                    "200": _reply("Moved (or, for a patch that changes nothing, as it was)",
                                  appointment, {"reschedule": moved}, headers={
                                      "ETag": _ref("headers", "ETag"), **{
                                          name: {"description": "The appointment's new URL, "
                                                                "when its date changed",
                                                 "schema": text}
                                          for name in ("Location", "Content-Location")}}),
                    "400": not_json,
                    "404": _ref("responses", "NotFound"),
                    "409": _problem("The user already has an appointment on the new date; "
                                    "`appointment` is that one, and nothing moved (or a "
                                    "request with this Idempotency-Key is still being "
                                    "processed)",
                                    "ConflictProblem"),
                    "411": _problem("No Content-Length (chunked bodies are refused)"),
                    "413": _problem("The body is larger than the server's limit"),
                    "415": _problem("The body is labelled neither "
                                    f"{' nor '.join(PATCH_TYPES)}", headers={
                                        "Accept-Patch": _ref("headers", "AcceptPatch")}),
                    "422": _problem("Fields are invalid, or null (a merge patch's removal), "
                                    "or user_id is another user's; `errors` lists each (or "
                                    "the Idempotency-Key came with another request: `errors` "
                                    "names it)", "ValidationProblem", key_reused=key_reused),
                    **stale, **store_errors}},
            "delete": {"summary": "Cancel an appointment; the user may then book that "
                                  "date again",
                       **on_condition, "responses": {
                           "204": _reply("Cancelled"), **found,
                           "400": _problem("If-Match or If-None-Match is not * nor a list of "
                                           "entity tags, or Idempotency-Key not a string"),
                           "409": _problem("A request with this Idempotency-Key is still being "
                                           "processed", headers={
                                               "Retry-After": _ref("headers", "RetryAfter")}),
                           "422": _problem("The Idempotency-Key came with another request; "
                                           "`errors` names it", "ValidationProblem",
                                           key_reused=key_reused),
                           **stale, **store_errors}},
        },
        "/appointments.ics": {"get": {
            "summary": "A user's appointments as an iCalendar feed (RFC 5545) to subscribe to",
            "parameters": [_ref("parameters", "UserIdQuery"), _ref("parameters", "IfNoneMatch")],
            "responses": {"200": _reply(
                "One VEVENT per appointment (a user with none gets a VTIMEZONE of UTC: a "
                "calendar has a component). Its UID stays the same from booking to "
                "cancellation, through moves; SEQUENCE counts its changes and LAST-MODIFIED "
                "says when the last was made. DTSTAMP is when the feed was made; the weak "
                "ETag covers everything else, so it changes when an appointment does",
                text, media_type=CALENDAR_TYPE, **tagged), **unchanged, **errors,
                **store_errors}}},
        "/healthz": {"get": {
            "summary": "Whether bookings can be taken now (by the process that answers)",
            "responses": {"200": _reply(
                "They can: ok; or degraded, with --workers, while another worker keeps dying "
                "young (detail says which and how; this one serves, so keep sending it "
                "requests)", {
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"enum": ["ok", "degraded"]},
                                   "detail": {"type": "string"},
                                   "failing_workers": {"type": "array",
                                                       "items": {"type": "integer"}}}},
                {"health": {"status": "ok"}}),
                "503": _problem("They cannot, and detail says why: the database does not "
                                "answer or cannot be written (with Retry-After if a retry may "
                                "succeed), its files were deleted, or the service holds "
                                "--max-appointments",
                                headers={"Retry-After": _ref("headers", "RetryAfter")}),
                "default": errors["default"]}}},
        "/metrics": {"get": {
            "summary": "Counters for Prometheus (text exposition format 0.0.4): requests by "
                       "route template, method and status (each status an operation lists "
                       "here, at 0 from the start), their durations, stored "
                       "appointments, connections, dropped log lines; with --workers, "
                       "every worker's added up, whichever answers",
            "responses": {"200": _reply("The metrics", text, media_type=METRICS_TYPE),
                          "default": errors["default"]}}},
        "/openapi.json": {"get": {"summary": "This document", **conditional, "responses": {
            "200": _reply("OpenAPI 3.1", {"type": "object"}, **tagged), **unchanged,
            "default": errors["default"]}}},
        "/": {"get": {
            "summary": "The service's name and version, with links to "
                       f"{', '.join(url for _, url, _ in HOME_LINKS)}: a page, or JSON",
            "parameters": [_ref("parameters", "Accept"), _ref("parameters", "IfNoneMatch")],
            "responses": {"200": {
                "description": "As Accept prefers (RFC 9110 section 12.5.1): HTML by "
                               "default, or JSON; each with its own ETag",
                "content": {**_content(text, media_type=HTML_TYPE),
                            **_content(_ref("schemas", "Home"), {"home": home_json()})},
                "headers": {"ETag": _ref("headers", "ETag"), "Vary": vary}},
                **unchanged,
                "406": _problem(f"Accept takes neither {' nor '.join(HOME_TYPE_NAMES)}",
                                headers={"Vary": vary}),
                "default": errors["default"]}}},
        "/docs": {"get": {
            "summary": "An API reference for a browser: this document as a page, with a "
                       "form for each operation that sends the real request and shows "
                       "what came back",
            **conditional, "responses": {
                "200": _reply("The page; its script is /docs.js. Its "
                              "Content-Security-Policy lets it run that script alone and "
                              "talk to this server alone", text, media_type=HTML_TYPE,
                              headers={"ETag": _ref("headers", "ETag"),
                                       "Content-Security-Policy": {
                                           "description": "What the page may load and "
                                                          "where it may send requests",
                                           "schema": text}}),
                **unchanged, "default": errors["default"]}}},
        "/docs.js": {"get": {"summary": "The script of /docs", **conditional, "responses": {
            "200": _reply("JavaScript", text, media_type=SCRIPT_TYPE, **tagged), **unchanged,
            "default": errors["default"]}}},
    }
    responses = _response_components()
    for route in ROUTES:  # each operation's ID: its route function's name, in camelCase
        paths[route.path][route.method.lower()]["operationId"] = _camel(route.handler.__name__)
    for path, item in paths.items():
        if "get" in item:
            # If-Match, as every GET and HEAD evaluates it (unless_matched()).
            item["get"]["parameters"] = item["get"].get("parameters", []) + [
                _ref("parameters", "IfMatch")]
            item["get"]["responses"]["412"] = _problem(
                "The representation does not meet If-Match (a weak ETag never does); ETag "
                "is its tag now, where it has one", headers={"ETag": _ref("headers", "ETag")})
            # HEAD: as GET, with no content at all (RFC 9110 section 9.3.2).
            item["head"] = {
                "summary": f"{item['get']['summary']}: the headers of GET alone",
                **{key: value for key, value in item["get"].items()
                   if key not in ("summary", "responses", "operationId")},
                "operationId": "head" + item["get"]["operationId"][0].upper()
                               + item["get"]["operationId"][1:],
                "responses": {status: {key: value for key, value in (
                    responses[response["$ref"].rsplit("/", 1)[1]] if "$ref" in response
                    else response).items() if key != "content"}
                    for status, response in item["get"]["responses"].items()}}
        methods = _allow([method.upper() for method in item if method != "head"])
        item["options"] = {
            "summary": f"Which methods this path takes ({methods}); with --cors-origin, "
                       "a browser's preflight",
            "operationId": "options" + "".join(
                word.capitalize() for word in re.findall(r"[a-z]+", path.replace("{", "by_"))),
            "parameters": [  # OPTIONS answers for the path's shape, whatever fills it
                {"name": name, "in": "path", "required": True, "schema": text,
                 "example": _PATH_EXAMPLES[name]} for name in re.findall(r"{(\w+)}", path)] + [
                _ref("parameters", "Origin"), _ref("parameters", "AccessControlRequestMethod")],
            "responses": {"204": {"description": "Allow lists the methods; to an allowed "
                                                 "origin's preflight, the CORS headers too",
                                  "headers": {name: _ref("headers", name.replace("-", ""))
                                              for name in CORS_PREFLIGHT_HEADERS}}}}
    for path, item in paths.items():  # generators group the operations by tag
        for operation in item.values():
            operation["tags"] = ["appointments" if path.startswith("/appointments")
                                 else "service"]
            operation["parameters"] = operation.get("parameters", []) + [
                _ref("parameters", "RequestId")]
            for response in operation["responses"].values():
                _with_request_id(response)
    return paths


def _with_request_id(response: dict) -> None:
    """Add the X-Request-ID header, which every response carries, to a response."""
    if "$ref" not in response:  # a component's has it
        response["headers"] = {**response.get("headers", {}),
                               "X-Request-ID": _ref("headers", "XRequestID")}


# The series /metrics shows from the start, at 0: for each operation of the description
# (and OPTIONS *), each status among its responses, 500 (a bug, anywhere), 408 where a
# body is read (it came too slowly), and 499 where a reply may be large enough to keep
# (a listing, a feed: CLIENT_GONE, its client hung up); for a request no route answered,
# these, by its method: one it knows (a malformed head or path, no such path, not
# allowed there, too many header lines, HTTP/2), or not (one it does not know, or a
# head too long or cut off before its request line was read, by a deadline (408) or
# by shutdown (503); "other").
UNMATCHED_STATUSES = {"known": (400, 404, 405, 431, 500, 505),
                      "other": (400, 408, 414, 431, 500, 501, 503, 505)}


@functools.lru_cache(maxsize=None)
def request_series() -> Tuple[Series, ...]:
    """Every (route, method, status) a request can be counted by, as stated above."""
    series: List[Series] = []
    for path, item in _paths().items():
        for method, operation in item.items():
            statuses = {int(status) for status in operation["responses"] if status.isdigit()}
            # Any request may also have a query that cannot be read (400), or a body whose
            # framing this server cannot read (400, 411: check_framing()), or meet a bug (500).
            statuses |= {400, 411, 500}
            routes = [route for route in ROUTES if route.path == path
                      and route.method == ("GET" if method == "head" else method.upper())]
            if any(route.body_types for route in routes):
                statuses.add(408)
            if any(route.client_may_go for route in routes):
                statuses.add(CLIENT_GONE)
            series += [(path, method.upper(), status) for status in sorted(statuses)]
    series += [("*", "OPTIONS", status) for status in (204, 400, 411, 500)]
    for method in sorted(KNOWN_METHODS) + ["other"]:
        series += [(UNMATCHED, method, status)
                   for status in UNMATCHED_STATUSES["other" if method == "other" else "known"]]
    return tuple(series)


@functools.lru_cache(maxsize=None)
def openapi_document() -> dict:
    """The OpenAPI 3.1 description of every route in ROUTES, built once a process:
    every call returns the same dict, which callers read and never change."""
    minutes = "|".join(f"{minute:02d}" for minute in START_MINUTES)
    text, stamp = {"type": "string"}, {"type": "string", "format": "date-time"}
    date = {"type": "string", "format": "date", "pattern": date_pattern(),
            "description": f"A calendar date from {FIRST_DATE} to {LAST_DATE}"}
    time = {"type": "string", "pattern": f"^(?:[01][0-9]|2[0-3]):(?:{minutes}){_END}",
            "description": f"HH:MM, UTC, {starts_in_words()}"}
    user_id = _ref("schemas", "UserId")
    appointment = _ref("schemas", "Appointment")
    details = {detail.name: {"type": "string", "maxLength": detail.text.max_length,
                             "pattern": text_pattern(detail.text)} for detail in DETAILS}
    details_said = {detail.name: f"{detail.description}, {_text_words(detail.text)}"
                    for detail in DETAILS}
    condition = {"type": "string", "pattern": f"^(?:[ \\t]*\\*[ \\t]*|{ENTITY_TAG_LIST}){_END}",
                 "description": "*, or a list of entity tags (empty elements are ignored, "
                                "as RFC 9110 section 5.6.1.2 says)"}
    paths = _paths()
    responses = _response_components()
    user_id_text = {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_LENGTH,
                    "pattern": user_id_pattern()}
    return {
        "openapi": "3.1.0",
        "info": {"title": SERVICE_TITLE, "version": __version__,
                 "description": f"Book {length_in_words()} appointments that start "
                                f"{starts_in_words()} (UTC), one per user per date; any "
                                "number of users may "
                                "share a slot. HEAD works wherever GET does, and OPTIONS "
                                "everywhere. Every error is an RFC 9457 problem "
                                "(application/problem+json). Every response carries "
                                "X-Request-ID, which the log writes too. With --cors-origin, "
                                "responses "
                                "to an allowed Origin carry Access-Control-Allow-Origin, "
                                "Vary: Origin and Access-Control-Expose-Headers "
                                f"({CORS_EXPOSE_HEADERS})."},
        "tags": [{"name": "appointments", "description": "Booking, listing, rescheduling, "
                                                         "cancelling; the calendar feed"},
                 {"name": "service", "description": "Health, metrics, this document, and "
                                                    "pages for a browser: / and /docs"}],
        "servers": [{"url": "/", "description": "The server that serves this document"},
                    {"url": f"http://{DEFAULT_HOST}:{DEFAULT_PORT}",
                     "description": "python3 scheduler.py, as it starts by default"}],
        "paths": paths,
        "components": {
            "schemas": {
                "UserId": {**user_id_text, "description": "Brought to NFC (Unicode's "
                           "composed form) first: one user in any form, shown back in NFC. "
                           f"In NFC, at most {MAX_USER_ID_LENGTH} characters; not "
                           f"{' or '.join(DOT_SEGMENTS)} (no URL holds them); no control "
                           "characters, no "
                           "whitespace first or last, no invisible characters (format "
                           "characters, Unicode's default-ignorable ones, blanks such as "
                           "U+2800) but joiners between visible non-ASCII characters and "
                           "U+FE0E or U+FE0F after an emoji (a non-ASCII symbol, five other "
                           "emoji such as U+2139, and in a keycap: 1, U+FE0F, U+20E3). "
                           "maxLength and the pattern hold for the NFC form, which a "
                           "validator cannot compute: text in another form may fail them and "
                           "be taken, or pass them and be refused. The pattern reads alike "
                           "with and without ECMA-262's u flag; past U+FFFF it takes a joiner "
                           "or a variation selector beside any allowed character, and "
                           "reserved default-ignorable code points"},
                "NewAppointment": {
                    "type": "object", "required": ["user_id", "date", "time"],
                    "properties": {"user_id": {
                        "oneOf": [user_id, {"type": "integer",
                                            "minimum": -(10 ** (MAX_USER_ID_LENGTH - 1) - 1),
                                            "maximum": 10 ** MAX_USER_ID_LENGTH - 1}],
                        "description": "An integer means its decimal string (42.0 and 42 "
                                       "too), which must fit in "
                                       f"{MAX_USER_ID_LENGTH} characters"},
                        "date": date, "time": time,
                        **{detail.name: {**details[detail.name], "type": ["string", "null"],
                                         "description": details_said[detail.name]
                                                        + "; null: none"}
                           for detail in DETAILS}}},
                "AppointmentPatch": {
                    "type": "object", "description": "Fields left out stay as they are; "
                                                     "others are ignored",
                    "properties": {"date": date, "time": time, "user_id": {
                        "description": "If given, the appointment's own user",
                        "oneOf": [user_id, {"type": "integer"}]},
                        **{name: {**stamp, "description": f"If given, with date and time: "
                                                          f"the {name} they make"}
                           for name in _DERIVED},
                        **{detail.name: {**details[detail.name], "type": ["string", "null"],
                                         "description": details_said[detail.name]
                                                        + "; null removes it"}
                           for detail in DETAILS}}},
                "Appointment": {
                    "type": "object", "required": ["user_id", "date", "time", "start", "end"],
                    "properties": {"user_id": user_id, "date": date, "time": time,
                                   "start": stamp, "end": stamp,
                                   **{name: {**schema, "minLength": 1, "description":
                                             "There only when there is one"}
                                      for name, schema in details.items()}}},
                "AppointmentList": {
                    "type": "object", "required": ["user_id", "appointments"],
                    "properties": {"user_id": user_id,
                                   "appointments": {"type": "array", "items": appointment}}},
                "Home": {
                    "type": "object", "required": ["name", "version", "links"],
                    "properties": {"name": text, "version": text, "links": {
                        "type": "object", "description": "URLs relative to this server's",
                        "required": [name for name, _, _ in HOME_LINKS],
                        "properties": {name: {"type": "string", "format": "uri-reference",
                                              "description": about}
                                       for name, _, about in HOME_LINKS}}}},
                "Problem": {
                    "type": "object", "required": ["type", "title", "status", "detail"],
                    "properties": {"type": text, "title": text, "status": {"type": "integer"},
                                   "detail": text,
                                   "instance": {"type": "string", "format": "uri-reference",
                                                "description": "urn:uuid: and the response's "
                                                               "X-Request-ID, when that is a "
                                                               "UUID"},
                                   "request_id": {**text, "description": "The response's "
                                                  "X-Request-ID, when that is the client's "
                                                  "own and not a UUID"}}},
                "ValidationProblem": {"allOf": [_ref("schemas", "Problem"), {
                    "type": "object", "required": ["errors"],
                    "properties": {"errors": {"type": "array", "items": {
                        "type": "object", "required": ["field", "message"],
                        "properties": {"field": {**text, "description": "The body's field, "
                                                 "or the header (Idempotency-Key)"},
                                       "message": text}}}}}]},
                "ConflictProblem": {"allOf": [_ref("schemas", "Problem"), {
                    "type": "object", "properties": {"appointment": {
                        **appointment, "description": "The appointment in the way, or as it "
                                                      "now is (none while a request with the "
                                                      "same Idempotency-Key is processed)"}}}]},
            },
            "parameters": {
                "UserIdQuery": {"name": "user_id", "in": "query", "required": True,
                                "schema": user_id, "example": "alice",
                                "description": "Percent-encode it: a raw + means a space"},
                "From": {"name": "from", "in": "query", "schema": date,
                         "example": "2026-11-01", "description": "First date, inclusive"},
                "To": {"name": "to", "in": "query", "schema": date, "example": "2026-11-30",
                       "description": "Last date, inclusive; not before from (else 400)"},
                "UserIdPath": {"name": "user_id", "in": "path", "required": True,
                               "schema": user_id, "example": _PATH_EXAMPLES["user_id"],
                               "description": "Percent-encoded, / included (%2F)"},
                "DatePath": {"name": "date", "in": "path", "required": True, "schema": date,
                             "example": _PATH_EXAMPLES["date"]},
                "Accept": {"name": "Accept", "in": "header", "schema": text,
                           "description": "The media types the client takes, with weights "
                                          "(q=); those this resource has are "
                                          f"{' and '.join(HOME_TYPE_NAMES)}, the first by default"},
                "IfNoneMatch": {"name": "If-None-Match", "in": "header", "schema": condition,
                                "description": "ETags the client holds (or *): if one is "
                                               "current, a GET or HEAD gets 304 with no "
                                               "body, a PATCH or DELETE 412"},
                "IdempotencyKey": {  # no example: a client would send it every time
                    "name": "Idempotency-Key", "in": "header",
                    "schema": {"type": "string",
                               "pattern": r'^"(?:[ !#-\[\]-~]|\\[\\"]){1,%d}"$' % MAX_KEY_LENGTH},
                    "description": "A string (RFC 8941: in double quotes) of 1 to "
                                   f"{MAX_KEY_LENGTH} characters, new for each request (and "
                                   "the same for its retries): a random UUID in double "
                                   "quotes, say, as f'\"{uuid.uuid4()}\"' makes one in "
                                   "Python. A retry with it gets "
                                   "the first response again (with Idempotent-Replayed: "
                                   "true), and changes nothing; with another request, 422. "
                                   f"Kept 24 hours, and the newest {MAX_KEYS} by default "
                                   "(--max-idempotency-keys)"},
                "IfMatch": {"name": "If-Match", "in": "header", "schema": condition,
                            "description": "The ETag the client holds (or *): a PATCH or "
                                           "DELETE changes the appointment, and a GET or HEAD "
                                           "answers, only while it is still current, strongly "
                                           "compared; else 412"},
                "Origin": {"name": "Origin", "in": "header", "schema": text,
                           "description": "A browser's page origin (CORS)"},
                "AccessControlRequestMethod": {
                    "name": "Access-Control-Request-Method", "in": "header", "schema": text,
                    "description": "A browser's preflight: the method it is about to send"},
                "RequestId": {  # no example: a client would send it every time
                    "name": "X-Request-ID", "in": "header",
                    "schema": {"type": "string", "minLength": 1,
                               "maxLength": MAX_REQUEST_ID_LENGTH,
                               "pattern": f"^[{REQUEST_ID_CHARACTERS}]+{_END}"},
                    "description": f"The client's own ID for the request, "
                                   f"{request_id_in_words()}: the response carries it back "
                                   "and the log writes it. Without it, or with another "
                                   "value, the service makes one (a UUID)"},
            },
            "headers": {
                "ETag": {"description": "Changes exactly when the representation does; "
                                        "send it back in If-None-Match, or in If-Match "
                                        "to change what it tags", "schema": text},
                "RetryAfter": {"description": "Seconds to wait", "schema": text},
                "AcceptPatch": {"description": "The patch formats PATCH takes",
                                "schema": text},
                "Allow": {"description": "The methods the path takes", "schema": text},
                "AccessControlAllowOrigin": {"description": "The allowed origin, or *",
                                             "schema": text},
                "AccessControlAllowMethods": {"description": "What the origin may send",
                                              "schema": text},
                "AccessControlAllowHeaders": {"description": CORS_ALLOW_HEADERS,
                                              "schema": text},
                "AccessControlMaxAge": {"description": "Seconds a browser may keep the "
                                                       "answer", "schema": text},
                "XRequestID": {"description": "The request's ID, on every response: the "
                                              "client's X-Request-ID if it sent one that "
                                              "may be kept, else a UUID made here. The log "
                                              "writes it with the request (and beside the "
                                              "traceback of a 500); a problem says it as "
                                              "its instance (urn:uuid:...), or as request_id",
                               "schema": text},
            },
            "responses": responses,
        },
    }


@functools.lru_cache(maxsize=None)
def _description() -> Tuple[bytes, str]:
    """The appendix's document (at the end of the file) as it is sent, and its ETag:
    made once a process, as it changes with the code alone."""
    content = json_content(openapi_document())
    return content, entity_tag(content)


# --- Service: a request's one path to its reply ----------------------------------------

KEPT_FROM = 64  # appointments in a listing or feed from which its reply is kept...
KEPT_BYTES = 16 << 20  # ...while all the replies kept hold at most this, in each process


class KeptReplies:
    """The replies to listings and feeds of users with many appointments, kept until
    that user's appointments change (Store.version(), which sees changes made by
    other processes too), so that polling such a user, and its 304, cost about
    what polling a user with a few does. Only a key whose last reply held
    KEPT_FROM appointments or more is looked up, so smaller replies cost nothing
    more; the least recently used go first past KEPT_BYTES."""

    _UNKNOWN = object()  # the version of a reply made without one: equal to none

    def __init__(self, budget: int = KEPT_BYTES):
        self.budget = budget
        self._lock = threading.Lock()  # guards _kept and _size
        # key -> (the user's version when it was made, the reply, its size), oldest first
        self._kept: "collections.OrderedDict[tuple, Tuple[object, Reply, int]]" = \
            collections.OrderedDict()
        self._size = 0

    def reply(self, store: Store, key: tuple, user_id: str,
              make: Callable[[], Tuple[Reply, int]]) -> Reply:
        """The reply kept for key (a route's name and its parameters) while user_id's
        version is the one it was made for; else make() it: (the reply, how many
        appointments it holds)."""
        kept = self._kept.get(key)  # one call: atomic, as _keep() changes _kept under _lock
        if kept is None:
            reply, held = make()
            if held >= KEPT_FROM:  # next time its version is taken first, to keep it
                self._keep(key, self._UNKNOWN, reply)
            return reply
        version = store.version(user_id)  # first: a change after it makes it older
        if kept[0] == version:
            with self._lock:
                if key in self._kept:
                    self._kept.move_to_end(key)
            return kept[1]
        reply, held = make()
        self._keep(key, version if held >= KEPT_FROM else None, reply)
        return reply

    def _keep(self, key: tuple, version: object, reply: Optional[Reply]) -> None:
        """Keep the reply made for version (None: forget key's)."""
        size = len(reply.body) if version is not None else 0
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._size -= old[2]
            if version is None or size > self.budget:
                return
            self._kept[key] = (version, reply, size)
            self._size += size
            while self._size > self.budget:
                self._size -= self._kept.popitem(last=False)[1][2]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def print_log(message: str, **fields) -> None:
    """Where a Service logs by default (a server gives its own log): stderr. fields
    say more, for a log that writes them apart (--log-format json); a traceback
    follows the message."""
    print(message, *filter(None, [fields.get("traceback")]), sep="\n", file=sys.stderr)


class Exchange(NamedTuple):
    """A request on its way to its reply: Service.begin() has routed it and checked
    the body it declares, and says how many bytes of body to read for respond()."""

    request: RequestHead
    template: str  # the route's path template, UNMATCHED for none
    route: Optional[Route]
    params: Dict[str, str]  # the path's parameters, decoded
    body_length: int = 0  # bytes of body the route takes; 0: none to read
    error: Optional[BaseException] = None  # why it fails, found before its body
    request_id: str = ""  # its X-Request-ID: the client's (if it may be kept) or one made


class Service:
    """What every request shares, whichever server or client carries it: the store,
    the limits, the origins allowed cross-origin requests (CORS), the metrics, and
    where unexpected errors are logged. A request's one path to its reply is
    begin() (route it, and say how much body it needs), then respond() (with that
    body), for a Connection and for the tests' in-process client alike; neither
    touches a socket. problem() answers a request that never got that far.

    Each request has an ID: its client's X-Request-ID if that may be kept, else one
    made here (request_id()); begin() gives it (Exchange.request_id), a problem says
    it (HTTPError.problem()), and the caller sends it back with the reply
    (render_response()).

    Methods for the caller (a Connection, the in-process client):

    - begin(request), then respond(exchange, body, client_gone)
    - problem(error, request, line, origin, request_id): the reply to a request
      that failed before respond()
    - request_id(headers): the ID of a request with these headers
    - with_cors(reply, request, origin)

    Methods for the routes: processing(user_id, key), count_refused_key().

    Attributes a caller may set: log (where unexpected errors go) and now (the
    clock). It is not meant to be subclassed: the routes (ROUTES) and the store
    are where behaviour changes."""

    def __init__(self, store: Store, limits: Optional[Limits] = None,
                 cors_origins: Tuple[str, ...] = (), log: Callable[..., None] = print_log):
        self.store = store
        self.limits = limits if limits is not None else Limits()
        self.cors_origins = frozenset(cors_origins)  # empty: no CORS headers at all
        self.log = log  # log(message, **fields): fields as print_log() takes them
        self.now = utc_now  # the clock, for what says when it was made (a feed's DTSTAMP)
        self.kept = KeptReplies()  # listings and feeds of users with many appointments
        self._processing: set = set()  # (user ID, Idempotency-Key) of writes under way here
        self._keys_refused = 0  # writes refused for want of room for their key
        self._processing_lock = threading.Lock()  # guards _processing and _keys_refused
        self.metrics = Metrics(request_series)  # (the appendix, at the end of the file)
        self.metrics.collectors.append(self._store_metrics)
        self.metrics.process_collectors += [self._key_metrics, store.samples]

    def _store_metrics(self) -> List[Sample]:
        """The stored appointments and keys; none while the store cannot be read (its
        database down or damaged), so that /metrics still shows the numbers an
        operator looks at then: the 503s, the connections."""
        try:
            return [("scheduler_appointments", "gauge", "Appointments stored, over all users.",
                     self.store.count()),
                    ("scheduler_idempotency_keys", "gauge", "Idempotency-Keys kept, over all "
                     "users.", self.store.count_keys())]
        except StoreUnavailable:
            return []

    @staticmethod
    def request_id(headers: Mapping[str, str]) -> str:
        """The ID of a request with these headers: its X-Request-ID, if that may be
        kept (_REQUEST_ID), else a new one (RequestIds)."""
        given = headers.get("x-request-id")
        if given is not None and _REQUEST_ID.fullmatch(given):
            return given
        return _REQUEST_IDS.next()

    def begin(self, request: RequestHead) -> Exchange:
        """Match the request's route and, if the route takes a body, check the one
        the request declares (body_length); if it takes none, check that the
        request's framing can be read (check_framing): all that can refuse it
        before a byte of its body is read."""
        route, request_id = None, self.request_id(request.headers)
        try:
            route, params = match(ROUTES, request.method, request.path)
            if route.body_types:
                length = body_length(request, self.limits.max_body_bytes, route.body_types)
            else:
                length = 0
                if "content-length" in request.headers or "transfer-encoding" in request.headers:
                    check_framing(request)
        except Exception as error:
            return Exchange(request, route.path if route else UNMATCHED, route, {}, 0, error,
                            request_id)
        return Exchange(request, route.path, route, params, length, None, request_id)

    def respond(self, exchange: Exchange, body: bytes = b"",
                client_gone: Callable[[], bool] = lambda: False) -> Reply:
        """The reply to a begun request, given its body: decode the body if the route
        takes one, and run the route; an error becomes its problem; then
        If-None-Match may make it a 304, and CORS adds its headers. client_gone
        tells whether the client has hung up; ClientGone passes through."""
        request, request_id = exchange.request, exchange.request_id
        try:
            if exchange.error is not None:
                raise exchange.error
            route = exchange.route
            reply = route.handler(self, Request(
                exchange.params, parse_query(request.query),
                decode_json(body) if route.body_types else None, request.headers,
                request.method, request.path + "?" + request.query if request.query
                else request.path, body, client_gone, request_id))
            if "if-match" in request.headers:  # first (RFC 9110 section 13.2.2)
                reply = unless_matched(request, reply)
            if "if-none-match" in request.headers:
                reply = not_modified(request, reply)
        except ClientGone:
            raise
        except Exception as error:
            return self.problem(error, request, request_id=request_id)
        return self.with_cors(reply, request)

    @contextlib.contextmanager
    def processing(self, user_id: str, key: str):
        """Mark a write with the user's Idempotency-Key as under way in this process,
        for the length of the with block. Raises a 409 HTTPError if one already is.
        (A write with the same key in another process is not seen here: its
        transaction makes this one wait, and this one then finds the key kept.)"""
        with self._processing_lock:
            if (user_id, key) in self._processing:
                raise HTTPError(409, "A request with this Idempotency-Key is still being "
                                     "processed; retry once it has been answered.",
                                headers={"Retry-After": "1"})
            self._processing.add((user_id, key))
        try:
            yield
        finally:
            with self._processing_lock:
                self._processing.discard((user_id, key))

    def count_refused_key(self) -> None:
        """Count a write refused because no Idempotency-Key could make room."""
        with self._processing_lock:
            self._keys_refused += 1

    def _key_metrics(self) -> List[Sample]:
        with self._processing_lock:
            refused = self._keys_refused
        return [("scheduler_idempotency_keys_refused_total", "counter",
                 "Writes refused (429 or 503) because their Idempotency-Key could not be "
                 "kept: the user's or every user's keys protect changes made within 24 "
                 "hours.", refused)]

    def problem(self, error: BaseException, request: Optional[RequestHead] = None,
                line: str = "", origin: Optional[str] = None,
                request_id: Optional[str] = None) -> Reply:
        """error_reply(error) for the request (None: one that could not be parsed;
        line is then what arrived of its request line, origin its Origin, if found),
        logging the traceback of an unexpected error (a 500). request_id: its
        X-Request-ID, if known (else request_id() of its headers). Call it where
        the error is being handled."""
        if request_id is None:
            request_id = self.request_id(request.headers if request is not None else {})
        reply = error_reply(error, request_id)
        where = f"{request.method} {request.path}" if request is not None else line
        if reply.status == HTTPStatus.INTERNAL_SERVER_ERROR:
            self.log(f"Unexpected error in {where!r} (request ID {request_id}):",
                     traceback=traceback.format_exc(), request_id=request_id)
        elif isinstance(error, StoreUnavailable) and error.cause:  # one line: repr escapes
            self.log(f"The database failed in {where!r} (request ID {request_id}): "
                     f"{error.cause!r}", request_id=request_id)
        return self.with_cors(reply, request, origin)

    def with_cors(self, reply: Reply, request: Optional[RequestHead] = None,
                  origin: Optional[str] = None) -> Reply:
        """The reply with its CORS headers, if the service has --cors-origin: for the
        request, or for a request known only by its origin (which cannot be a
        preflight, since its head could not be read)."""
        if not self.cors_origins:
            return reply
        preflight = False
        if request is not None:
            origin = request.headers.get("origin")
            preflight = request.method == "OPTIONS" \
                and "access-control-request-method" in request.headers
        return reply._replace(headers=reply.headers + cors_headers(self.cors_origins, origin,
                                                                   preflight, reply))


# --- Routes ---------------------------------------------------------------------------
# Each route is a function from parsed input to a Reply. It never sees a socket, and
# raises HTTPError (or lets a domain error through) when it cannot answer.


# RFC 3986's unreserved characters (section 2.3): what percent-encoding leaves as it is.
_UNRESERVED = re.compile(r"[-0-9A-Za-z._~]*")


def appointment_url(appointment: Appointment) -> str:
    """The appointment's own URL, with the user ID percent-encoded so that any ID
    (with /, ?, spaces or CR/LF) stays one path segment and one header line."""
    user = appointment.user_id
    if not _UNRESERVED.fullmatch(user):  # else quote() would return it as it is
        user = urllib.parse.quote(user, safe="")
    return f"/appointments/{user}/{_start_strings(appointment.start)[0]}"


def _query_value(query: Dict[str, List[str]], name: str) -> Optional[str]:
    """The one value of a query parameter, or None; 400 when repeated."""
    values = query.get(name)
    if values is None:
        return None
    if len(values) > 1:
        raise HTTPError(400, f"Give the {name} query parameter once.")
    return values[0]


def query_user_id(query: Dict[str, List[str]]) -> str:
    """The user_id query parameter; 400 when missing, repeated or invalid."""
    value = _query_value(query, "user_id")
    if not value:
        raise HTTPError(400, "The user_id query parameter is required, "
                             "e.g. /appointments?user_id=alice.")
    try:
        return parse_user_id(value)
    except ValueError as error:
        raise HTTPError(400, f"Invalid query parameter: user_id {error}.") from None


def query_date_range(query: Dict[str, List[str]]) -> Tuple[Optional[dt.date], Optional[dt.date]]:
    """The optional inclusive bounds from= and to=; 400 when malformed or when
    from is after to."""
    bounds = []
    for name in ("from", "to"):
        value = _query_value(query, name)
        try:
            bounds.append(None if value is None else parse_date(value))
        except ValueError as error:
            raise HTTPError(400, f"Invalid query parameter: {name} {error}.") from None
    first, last = bounds
    if first and last and first > last:
        raise HTTPError(400, f"from ({first.isoformat()}) is after to ({last.isoformat()}); "
                             "the range is inclusive, so from must be on or before to.")
    return first, last


def path_key(params: Dict[str, str]) -> Tuple[str, dt.date]:
    """The user ID and date from /appointments/{user_id}/{date}; 400 if either is
    malformed (a well-formed one that is not booked is a NotBooked later)."""
    try:
        user_id = parse_user_id(params["user_id"])
    except ValueError as error:
        raise HTTPError(400, f"Invalid path: user_id {error}.") from None
    try:
        return user_id, parse_date(params["date"])
    except ValueError as error:
        raise HTTPError(400, f"Invalid path: date {error}.") from None


LISTED_KEPT = 2 * MAX_APPOINTMENTS_PER_USER  # appointments whose JSON is kept for listings


@functools.lru_cache(maxsize=LISTED_KEPT)
def _listed(appointment: Appointment) -> str:
    """An appointment's JSON as a listing holds it. Kept, the least recently listed
    going first: a user's listing is asked for again and again (an app polls it),
    and each range of a long one (from, to) is a reply of its own, made of the same
    appointments; an appointment that changes is another key."""
    return _encode_json(appointment.as_json())


def listing(user_id: str, appointments: List[Appointment]) -> Reply:
    """A 200 of the user's appointments, with its ETag. The content is what
    json_content() makes of {"user_id": ..., "appointments": [...]}, byte for byte,
    joined from each appointment's kept text (_listed())."""
    return tagged((f'{{"user_id": {_json_text(user_id)}, "appointments": ['
                   + ", ".join(map(_listed, appointments)) + "]}\n").encode())


@route("GET", "/appointments", client_may_go=True)
def list_appointments(service: Service, request: Request) -> Reply:
    user_id = query_user_id(request.query)
    first, last = query_date_range(request.query)

    def make() -> "Tuple[Reply, int]":  # quoted: not evaluated at every request
        appointments = service.store.list_for_user(user_id, first, last)
        if len(appointments) >= KEPT_FROM and request.client_gone():
            raise ClientGone()
        return listing(user_id, appointments), len(appointments)

    return service.kept.reply(service.store, ("list", user_id, first, last), user_id, make)


def write_once(service: Service, request: Request, user_id: str,
               perform: Callable[[Optional[Keyed]], object],
               reply_for: Callable[[object], Reply]) -> Reply:
    """A write's reply: perform(keyed) makes the change in the store, reply_for(its
    result) is the reply. With an Idempotency-Key, which belongs to user_id (the
    user the request names), the store keeps the reply (or the error's, as
    error_reply() makes it; not a 5xx, which a retry may not get) with the change,
    and a retry of the same request gets it again, byte for byte in its body, with
    Idempotent-Replayed: true (as Stripe's API says it). The same key with another
    method, target or body is a 422; a retry that arrives while the first is still
    being handled in this process is a 409 (draft section 2.6)."""
    key = idempotency_key(request.headers)
    if key is None:
        return reply_for(perform(None))
    fingerprint = hashlib.sha256(f"{request.method} {request.target}\n".encode()
                                 + request.content).digest()

    def render(outcome) -> Optional[Replay]:
        reply = error_reply(outcome, request.request_id or None) \
            if isinstance(outcome, Exception) else reply_for(outcome)
        if reply.status >= 500:
            return None
        return Replay(fingerprint, reply.status, reply.media_type, reply.headers,
                      content_of(reply.body))

    with service.processing(user_id, key):
        try:
            return reply_for(perform(Keyed(user_id, key, fingerprint, render)))
        except AlreadyKeyed as kept:
            replay = kept.replay
        except KeysFull:
            service.count_refused_key()
            raise
    if replay.fingerprint != fingerprint:
        raise HTTPError(422, "This Idempotency-Key came with another request (method, URL or "
                             "body) in the last 24 hours; send a new key with a new request.",
                        errors=[{"field": "Idempotency-Key", "message": "Idempotency-Key is "
                                 "another request's: make a new one for each request"}])
    return Reply(HTTPStatus(replay.status), replay.body,
                 replay.headers + (("Idempotent-Replayed", "true"),), replay.media_type)


@route("POST", "/appointments", (JSON_TYPE,))
def book_appointment(service: Service, request: Request) -> Reply:
    if not isinstance(request.body, dict):
        raise not_an_object()
    appointment = parse_appointment(request.body)
    return write_once(service, request, appointment.user_id,
                      lambda keyed: service.store.book(appointment, keyed), booked_reply)


def booked_reply(booked: Appointment) -> Reply:
    """A 201 with the appointment, its URL and its ETag as a GET of that URL gives it,
    so that a client may edit it (If-Match) without a GET first: encoded here, once,
    to be hashed and sent."""
    content = json_content(booked.as_json())
    return Reply(HTTPStatus.CREATED, content, (("Location", appointment_url(booked)),
                                               ("ETag", _hashed_tag(content))))


@route("GET", "/appointments/{user_id}/{date}")
def show_appointment(service: Service, request: Request) -> Reply:
    return tagged_json(service.store.get(*path_key(request.params)).as_json())


@route("PATCH", "/appointments/{user_id}/{date}", PATCH_TYPES)
def reschedule_appointment(service: Service, request: Request) -> Reply:
    """PATCH with a JSON merge patch (RFC 7396) of date, time and details: the
    appointment changes in one step, or not at all. When its date changes, so
    does its URL."""
    user_id, date = path_key(request.params)
    if not isinstance(request.body, dict):
        raise HTTPError(400, "The request body must be a JSON object (a merge patch) of the "
                             'fields to change, e.g. {"date": "2026-11-26", "time": "10:00"}.')
    condition = write_condition(request.headers)
    changes = parse_changes(request.body, user_id)

    def moved_reply(moved: Appointment) -> Reply:
        reply = tagged_json(moved.as_json())  # its ETag, as a GET of its URL now gives it
        if moved.date == date:
            return reply
        url = appointment_url(moved)  # Content-Location: the body is what is now there
        return reply._replace(headers=reply.headers + (("Location", url),
                                                       ("Content-Location", url)))

    return write_once(service, request, user_id, lambda keyed: service.store.reschedule(
        user_id, date, changes, condition, keyed), moved_reply)


@route("DELETE", "/appointments/{user_id}/{date}")
def cancel_appointment(service: Service, request: Request) -> Reply:
    user_id, date = path_key(request.params)
    condition = write_condition(request.headers)
    return write_once(service, request, user_id,
                      lambda keyed: service.store.cancel(user_id, date, condition, keyed),
                      lambda _: Reply(HTTPStatus.NO_CONTENT, None))


@route("GET", "/appointments.ics", client_may_go=True)
def show_calendar(service: Service, request: Request) -> Reply:
    """The feed, with a weak ETag of everything in it but the DTSTAMPs, which say
    when it was made: a calendar app polling it gets 304 until an appointment
    changes (README, Decisions)."""
    user_id = query_user_id(request.query)

    def make() -> "Tuple[Reply, int]":  # quoted: not evaluated at every request
        events = service.store.events(user_id)
        if len(events) >= KEPT_FROM and request.client_gone():
            raise ClientGone()
        now = service.now()
        feed = calendar_feed(user_id, events, now)
        tag = entity_tag(feed.replace(f"DTSTAMP:{_ical_instant(now)}", "").encode(), weak=True)
        return Reply(HTTPStatus.OK, feed.encode(), (("ETag", tag),), CALENDAR_TYPE), \
            len(events)

    return service.kept.reply(service.store, ("feed", user_id), user_id, make)


@route("GET", "/healthz")
def check_health(service: Service, request: Request) -> Reply:
    """503 while this process cannot take bookings (the store's check() says why);
    else 200: "ok", or with --workers "degraded" while another worker keeps dying
    young. A degraded answer is still 200 because this worker serves, and the
    socket is shared (a connection goes to whichever worker accepts it), so a load
    balancer should keep sending requests. The body says which worker fails and
    how, for the operator and the monitoring."""
    try:
        service.store.check()
    except StoreFull as full:  # retrying will not help: no Retry-After
        raise HTTPError(503, f"Bookings cannot be taken: the service holds its maximum of "
                             f"{full.capacity} appointments, and each booking gets 507. "
                             "Cancellations make room; or restart it with a higher "
                             "--max-appointments.") from None
    failing = service.metrics.failing_workers()
    if not failing:
        return Reply(HTTPStatus.OK, {"status": "ok"})
    detail = " ".join(
        f"Worker {worker['worker']} keeps dying young ({worker['deaths']} times in a row; "
        f"the last {worker['last']})." for worker in failing)
    return Reply(HTTPStatus.OK, {
        "status": "degraded",
        "detail": f"{detail} The supervisor starts it again after a wait that doubles each "
                  "time, and its log says why; this worker serves.",
        "failing_workers": [worker["worker"] for worker in failing]})


@route("GET", "/metrics")
def show_metrics(service: Service, request: Request) -> Reply:
    return Reply(HTTPStatus.OK, service.metrics.exposition(), media_type=METRICS_TYPE)


@route("GET", "/openapi.json")
def show_api_description(service: Service, request: Request) -> Reply:
    content, tag = _description()
    return Reply(HTTPStatus.OK, content, (("ETag", tag),))


@route("GET", "/")
def show_home(service: Service, request: Request) -> Reply:
    """The service's name and version, and its links: a page, or JSON where Accept
    prefers it (the reply says Vary: Accept)."""
    media_type = negotiate(request.headers.get("accept"), HOME_TYPES)
    if media_type is None:
        raise HTTPError(406, f"This resource is sent as {' or '.join(HOME_TYPE_NAMES)}, and the "
                             "Accept header takes neither; send Accept: application/json, "
                             "or no Accept.", headers={"Vary": "Accept"})
    return home_reply(media_type)


@route("GET", "/docs")
def show_docs(service: Service, request: Request) -> Reply:
    return docs_reply(script=False)


@route("GET", "/docs.js")
def show_docs_script(service: Service, request: Request) -> Reply:
    return docs_reply(script=True)


# ======================================================================================
# Part two: an HTTP/1.1 runtime, standard library only. It reads requests off sockets
# and writes replies, and reaches part one only through Service (begin(), respond(),
# problem()) and Metrics, and the values they take and give (RequestHead, Reply...).
# ======================================================================================

# --- Wire format: HTTP/1.1 messages as bytes (RFC 9112) --------------------------------
# Requests' heads read, and replies written, by functions over bytes and values: none
# touches a socket.

MAX_HEAD_BYTES = 65536  # the request line and headers together; more gets 414 or 431...
MAX_HEADERS = 100  # ...and so do more header lines than this
# What RFC 9112 allows: a request line of a token method, a target of visible ASCII and
# the version, one SP apart (section 3); a header line of a token name, a colon and a
# value without control characters but HTAB (section 5; RFC 9110 sections 5.5, 5.6.2).
_TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([!-~]+) HTTP/([0-9])\.([0-9])")
_HEADER_LINE = re.compile(rf"({_TOKEN}):([^\x00-\x08\x0a-\x1f\x7f]*)\r?")
# A Host value: RFC 3986's host (an IP literal in brackets, or a name or IPv4 address
# of unreserved characters, sub-delims and percent-encodings) and an optional port,
# or nothing (RFC 9110 section 7.2). Written as runs of the characters between the
# percent-encodings: read twice as fast as a choice at each character, and as
# linear (each run after the first begins with a "%").
_HOST_CHARACTERS = "[-0-9A-Za-z._~!$&'()*+,;=]*"
_HOST = re.compile(rf"(?:\[[-0-9A-Za-z:._~!$&'()*+,;=]+\]|{_HOST_CHARACTERS}"
                   rf"(?:%[0-9A-Fa-f]{{2}}{_HOST_CHARACTERS})*)(?::[0-9]*)?")


_HTTP_SCHEMES = ("http", "https")  # of an absolute-form target; compared in lower case


def split_target(target: str) -> Tuple[str, str]:
    """The path and query of a request target. Clients send the origin form,
    /path?query; a server must also accept the absolute form that proxies get,
    http://host/path?query (RFC 9112 section 3.2.2). Only a target that does not
    start with "/" can be absolute, so "://" inside a path stays part of the path.
    Raises HTTPError 400 for a fragment, which no form holds (section 3.2), and for
    an absolute form of another scheme: read past them, a path would be routed that
    any other reader of the URI (a proxy's rule, say) would not see there."""
    if "#" in target:
        raise HTTPError(400, "The request target has a fragment ('#'), which a client keeps "
                             "to itself (RFC 9112 section 3.2); percent-encode a '#' in a "
                             "user ID as %23.")
    path, _, query = target.partition("?")
    if not path.startswith("/") and "://" in path:
        scheme, _, rest = path.partition("://")
        if scheme.lower() not in _HTTP_SCHEMES:
            raise HTTPError(400, f"The request target's scheme {scheme[:20]!r} is not http or "
                                 "https; send the path, /appointments?...")
        authority, _, path = rest.partition("/")
        if not authority.rpartition("@")[2].partition(":")[0] and not authority.startswith("["):
            raise HTTPError(400, "The request target has no host (RFC 9110 section 4.2.1); "
                                 "send the path, /appointments?...")
        path = "/" + path
    return path, query


# A server SHOULD ignore blank lines before a request line (RFC 9112 section 2.2); an
# empty line ends the head (section 2.1). Bare LFs are taken for CRLF (section 2.2).
_BLANK_LINES = re.compile(rb"(?:\r?\n)*")
_HEAD_END = re.compile(rb"\n\r?\n")


def find_head(data: Union[bytes, bytearray], searched: int = 0) -> Optional[Tuple[int, int]]:
    """Where the head of the request that data begins with lies, as (start, end):
    start after the blank lines a client may send first, end after the empty line;
    None while the head is not whole. data[:searched] is known to hold no end, so
    a head that arrives in many pieces is searched once, not once a piece. Raises
    HTTPError 414 (the request line) or 431 (the headers) when the head, with the
    blank lines before it, cannot be whole within MAX_HEAD_BYTES."""
    start = _BLANK_LINES.match(data).end()
    end = _HEAD_END.search(data, max(start, searched - 2), MAX_HEAD_BYTES)
    if end is not None:
        return start, end.end()
    if len(data) < MAX_HEAD_BYTES:
        return None
    line_ended = data.find(b"\n", start, MAX_HEAD_BYTES) != -1
    raise HTTPError(431 if line_ended else 414,
                    f"The request line and headers are longer than {MAX_HEAD_BYTES} bytes.")


def request_line(head: bytes) -> str:
    """The head's first line, as text: what the access log shows."""
    line = head.split(b"\n", 1)[0]
    return str(line[:-1] if line.endswith(b"\r") else line, "iso-8859-1")


def parse_head(head: bytes) -> RequestHead:
    """The request whose head (from find_head) this is, or HTTPError saying what is
    wrong with it. http.server's own parser (the email package) is not used: it
    spent much of each request's time. This one is also stricter, as RFC 9112
    asks: one SP between the parts of the request line, an ASCII target, no
    HTTP/0.9, no folded lines, no space before a colon, one Host."""
    lines = str(head, "iso-8859-1").split("\n")
    line = lines[0][:-1] if lines[0].endswith("\r") else lines[0]
    parts = _REQUEST_LINE.fullmatch(line)
    if parts is None:
        raise _bad_request_line(line)
    method, target, major, minor = parts.groups()
    if major != "1":
        raise HTTPError(505, f"HTTP version {major}.{minor} is not supported; use 1.1.")
    del lines[0], lines[-2:]  # the request line; the empty line and what follows it
    if len(lines) > MAX_HEADERS:
        raise HTTPError(431, f"More than {MAX_HEADERS} header lines.")
    headers: Dict[str, str] = {}
    repeated: Dict[str, List[str]] = {}  # joined once at the end, not once a line
    for text in lines:
        field = _HEADER_LINE.fullmatch(text)
        if field is None:
            raise HTTPError(400, f"Malformed header line {text[:100]!r}.")
        name, value = field.groups()
        name, value = name.lower(), value.strip(" \t")
        if name in headers:
            repeated.setdefault(name, [headers[name]]).append(value)
        else:
            headers[name] = value
    for name, values in repeated.items():
        headers[name] = ", ".join(values)
    if minor != "0" and "," in headers.get("host", ","):  # none, or several joined
        raise HTTPError(400, "An HTTP/1.1 request needs exactly one Host header (RFC 9112).")
    host = headers.get("host")
    if host is not None and not _HOST.fullmatch(host):  # RFC 9112 section 3.2
        raise HTTPError(400, f"The Host header {host[:100]!r} is not a host and port.")
    if method not in KNOWN_METHODS:
        raise HTTPError(501, f"Unknown method {method!r}.")
    return RequestHead(method, *split_target(target), f"HTTP/1.{minor}", headers)


def _bad_request_line(line: str) -> HTTPError:
    """What is wrong with a request line that _REQUEST_LINE refused."""
    words = line.split(" ")
    if len(words) == 3 and re.fullmatch(_TOKEN, words[0]):
        if not words[1].isascii():
            return HTTPError(400, "The request target has bytes that are not ASCII; "
                                  "percent-encode them as UTF-8 (é is %C3%A9).")
        if not words[1].isprintable() or not words[1]:
            return HTTPError(400, "The request target has spaces or control characters; "
                                  "percent-encode them.")
        if not re.fullmatch(r"HTTP/[0-9]\.[0-9]", words[2]):
            return HTTPError(400, f"Bad HTTP version {words[2]!r}.")
    return HTTPError(400, f"Bad request line {line!r}: expected METHOD /path HTTP/1.1.")


def keep_alive(request: Optional[RequestHead], body_read: bool, draining: bool) -> bool:
    """Whether a connection serves another request after answering this one: the
    one place that decides. Not after a request that could not be read (None: what
    follows it is suspect), nor one whose body is left unread (it would be read as
    the next request), nor while the server drains. Otherwise as the client asks
    (RFC 9112 section 9.3): HTTP/1.1 stays open unless it says Connection: close;
    HTTP/1.0 closes unless it says Connection: keep-alive (appendix C.2.2)."""
    if request is None or draining or not (body_read or not request.declares_body):
        return False
    options = request.headers.get("connection", "").lower()
    if not options:
        return request.version != "HTTP/1.0"
    tokens = {token.strip() for token in options.split(",")}
    return "keep-alive" in tokens if request.version == "HTTP/1.0" else "close" not in tokens


def expects_continue(request: RequestHead) -> bool:
    """Whether the client waits for 100 Continue before it sends the body (RFC 9110
    section 10.1.1); an HTTP/1.0 client never does."""
    return request.headers.get("expect", "").lower() == "100-continue" \
        and request.version != "HTTP/1.0"


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Clock(NamedTuple):
    second: int
    http_date: str  # for the Date header
    log_time: str  # for the access log, as http.server writes it


_clock_now = _Clock(0, "", "")


def _clock() -> _Clock:
    """The current second's time strings, formatted once a second, not once a
    request. A race only formats the same second twice."""
    global _clock_now
    second = int(time.time())
    if _clock_now.second != second:
        _clock_now = _Clock(second, email.utils.formatdate(second, usegmt=True),
                            time.strftime("%d/%b/%Y %H:%M:%S", time.localtime(second)))
    return _clock_now


_utc_second = (0, "")  # a second, and it in RFC 3339 (without the Z): utc_timestamp()'s


def utc_timestamp() -> str:
    """Now, in RFC 3339 to the millisecond, UTC: for the JSON log. Each second is
    formatted once, as _clock() does."""
    global _utc_second
    now = time.time()
    whole, second = int(now), _utc_second  # one read: another thread may change it
    if second[0] != whole:
        second = _utc_second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{int((now - whole) * 1000):03d}Z"


_STATUS_LINES = {status: f"HTTP/1.1 {status.value} {reason}" for status, reason in REASONS.items()}


def render_response(reply: Reply, request_id: Optional[str] = None, *, keep_open: bool = True,
                    http_1_0: bool = False, head_only: bool = False) -> Tuple[bytes, int]:
    """A whole HTTP/1.1 response as bytes, for one write (separate writes for head
    and body meet Nagle's algorithm and delayed ACKs, and stall a keep-alive client
    for tens of milliseconds), and the size of its content. A body of None means no
    content at all (204): no Content-Type, no Content-Length. request_id: the
    request's ID (Service.request_id()), sent back in X-Request-ID, last of the
    reply's headers (None: none). keep_open is keep_alive()'s answer, said as
    Connection: close when false; as Connection: keep-alive when true to an
    HTTP/1.0 client, which otherwise waits for the close (RFC 9112 section 9.3,
    appendix C.2.2). head_only: the head alone, for HEAD."""
    body = content_of(reply.body)
    lines = [_STATUS_LINES[reply.status], f"Server: {SERVER_NAME}",
             f"Date: {_clock().http_date}"]
    if body is not None:
        lines += [f"Content-Type: {reply.media_type}", f"Content-Length: {len(body)}"]
    for name, value in reply.headers:
        lines.append(f"{name}: {value}")
    if request_id is not None:
        lines.append(f"X-Request-ID: {request_id}")
    if not keep_open:
        lines.append("Connection: close")
    elif http_1_0:
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    size = len(body or b"")
    return (head, size) if head_only or body is None else (head + body, size)


# An Origin header line, found in the bytes of a head that could not be parsed.
_ORIGIN_LINE = re.compile(rb"\n[Oo][Rr][Ii][Gg][Ii][Nn][ \t]*:[ \t]*([!-~]+)[ \t]*\r?\n")


def lenient_origin(data: bytes) -> Optional[str]:
    """The Origin a request sent, from the bytes of a head that could not be parsed,
    if they hold one: so that a page's script can read why its request failed."""
    found = _ORIGIN_LINE.search(data)
    return None if found is None else str(found.group(1), "iso-8859-1")


_REQUEST_ID_LINE = re.compile(rb"\nx-request-id[ \t]*:[ \t]*([!-~]+)[ \t]*\r?\n", re.IGNORECASE)


def lenient_headers(data: bytes) -> Dict[str, str]:
    """What may be read of a head that could not be parsed for its X-Request-ID: a
    client's own, if the bytes hold one, for the answer to say it back."""
    found = _REQUEST_ID_LINE.search(data)
    return {} if found is None else {"x-request-id": str(found.group(1), "iso-8859-1")}


# --- Connection: one client's life, from accept to close ------------------------------

LINGER_SECONDS = 1.0  # how long a closing connection reads what the client still sends...
LINGER_BYTES = 1024 * 1024  # ...and how much of it, at most
RECEIVE_BYTES = 65536  # asked of each recv(): a whole head, or a body at the default cap
# A body this large (a kept reply, say) is sent after the head in the same system call
# (sendmsg()), where a smaller one is joined to it: copying it would cost a copy of
# its size for each connection it is being sent on.
SEND_APART_BYTES = 65536
ORIGIN_SEARCH_BYTES = 4 * MAX_HEAD_BYTES  # read of a head too long, to find its Origin (CORS)
# Kept of each piece read past MAX_HEAD_BYTES: an Origin line (scheme, host and port, 270
# characters at most) that two reads cut in two is found whole, if shorter than this.
ORIGIN_LINE_BYTES = 1024
# Control characters in log lines could forge lines or drive a terminal: show them as \xNN.
_LOG_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
# The JSON log's: ASCII alone, every other character (a byte of a head, read as
# ISO-8859-1: any byte) escaped as \u00NN, so that any bytes make one valid line.
_LOG_ENCODER = json.JSONEncoder(ensure_ascii=True, check_circular=False)
_json_string = json.encoder.encode_basestring_ascii  # what _LOG_ENCODER does to a str

# An access log line says, of a response: the client's address, the request line
# (what arrived of it), the status, the bytes of content sent, the request's
# duration in microseconds (as /metrics' histogram has it: from its head read to its
# response ready to send; for a head that could not be read, from when that was
# found), its ID, and (in JSON) its User-Agent, from the request (None: not read).
# --log-format picks one of ACCESS_LOG_LINES.


def access_log_line(client_address: tuple, line: str, status: int, size: int, seconds: float,
                    request_id: str, request: Optional[RequestHead] = None) -> str:
    """A response's line in the text access log: http.server's format, then the
    duration (as Apache's %D) and the request ID (with no space nor quote:
    RequestIds, _REQUEST_ID)."""
    if not (line.isascii() and line.isprintable()):  # else there is nothing to escape
        line = line.translate(_LOG_ESCAPES)
    return (f'{client_address[0]} - - [{_clock().log_time}] "{line}" {status} {size} '
            f'{int(seconds * 1_000_000)} {request_id}')


def access_log_json(client_address: tuple, line: str, status: int, size: int, seconds: float,
                    request_id: str, request: Optional[RequestHead] = None) -> str:
    """A response's line in the JSON access log: one object, on one line (what is
    missing, null). Written out, not by _LOG_ENCODER, which makes its encoder anew
    for each line; the address and the request ID need no escapes (_REQUEST_ID)."""
    agent = request.headers.get("user-agent") if request is not None else None
    method, _, rest = line.partition(" ")
    target, _, protocol = rest.rpartition(" ") if " " in rest else (rest, "", "")
    return (f'{{"time": "{utc_timestamp()}", "client": "{client_address[0]}", '
            f'"method": {_json_string(method) if method else "null"}, '
            f'"target": {_json_string(target) if target else "null"}, '
            f'"protocol": {_json_string(protocol) if protocol else "null"}, '
            f'"status": {int(status)}, "bytes": {size}, '
            f'"duration_us": {int(seconds * 1_000_000)}, '
            f'"request_id": "{request_id}", '
            f'"user_agent": {"null" if agent is None else _json_string(agent)}}}')


ACCESS_LOG_LINES = {"text": access_log_line, "json": access_log_json}


class Connection:
    """One client connection, from accept to close, served by one thread: the one
    object that owns its socket, its phase and its deadline. serve() reads each
    request's bytes and hands them to the wire format's functions (find_head(),
    parse_head(), keep_alive(), render_response()) and to the Service. Those never
    touch the socket, and this class does nothing but read and write it.

        event                            phase     deadline
        the server accepts it            NEW       none until its thread serves it
        serve() waits for a request      WAITING   now + first_byte_timeout, for a new
                                                   connection; else now + idle_timeout
        a request's first byte arrives   READING   that byte + request_timeout
        the head is parsed               BUSY      none while the request is handled
        its body is awaited (one that    READING   the request's, from its first byte
        came with the head is not)
        the response is sent             WRITING   now + request_timeout; once sent,
                                                   if kept open, WAITING: idle_timeout
                                                   (READING if the next request has
                                                   begun to arrive)
        close()                          CLOSED

    The phase changes only through _enter(), as _NEXT_PHASES allows; any other
    change raises RuntimeError (a bug: the server logs it, and closes the
    connection), as h11's state machine does.

    The socket stays blocking (a socket timeout adds a poll() to every read and
    write, and each system call hands over the GIL); instead the server's watchdog
    calls expire_if_late(), which shuts down the socket of a late connection. A
    connection late while WAITING reads end-of-file and closes; one late while
    READING answers 408; one late while WRITING fails to send, and closes.

    The server makes a Connection when it accepts one (it counts from then) and
    serves it in a thread of its own: SchedulerServer.finish_request() calls
    serve(), where socketserver would make a request handler.

    Methods for the server:

    - Connection(sock, client_address, server); server gives limits, log,
      draining and closing_idle
    - serve(service), in the connection's own thread, then close() (both from
      SchedulerServer's hooks)
    - refuse(service, reply), from the accepting thread: answer and close
    - from other threads: expire_if_late(now) (the watchdog), close_if_idle(),
      phase and waiting_since

    Nothing is meant to be overridden. The phases are enforced: a change that
    _NEXT_PHASES does not allow raises RuntimeError.
    """

    NEW, WAITING, READING, BUSY, WRITING, CLOSED = (
        "new", "waiting", "reading", "busy", "writing", "closed")
    _NEXT_PHASES = {  # each phase, and the phases it may go to
        NEW: (WAITING, CLOSED),  # CLOSED: its thread could not be started
        WAITING: (READING, CLOSED),
        READING: (BUSY, WRITING, CLOSED),  # WRITING: the answer to a request that failed
        BUSY: (READING, WRITING, CLOSED),
        WRITING: (WAITING, READING, CLOSED),
        CLOSED: ()}

    def __init__(self, sock: socket.socket, client_address: tuple, server):
        self._sock, self.client_address = sock, client_address
        self._server = server
        self._limits: Limits = server.limits
        self._lock = threading.Lock()  # guards _phase, _deadline, _expired: the watchdog reads them
        self._phase = self.NEW
        self._deadline: Optional[float] = None  # time.monotonic(); None while NEW or BUSY
        # Why the connection ends, once set: its deadline passed ("deadline", set by the
        # watchdog), or close_if_idle() ended its wait ("closed"). None until then.
        self._expired: Optional[str] = None
        self._data = bytearray()  # received and not yet taken: a request's start, or more
        self._request_deadline = 0.0  # the current request's, from its first byte
        self._served = 0  # responses sent
        self.waiting_since = 0.0  # time.monotonic() when it last began to wait, if WAITING

    def _enter(self, phase: str, deadline: Optional[float]) -> None:
        if phase not in self._NEXT_PHASES[self._phase]:  # only this thread changes it
            raise RuntimeError(f"a connection cannot go from {self._phase} to {phase}")
        with self._lock:
            self._phase, self._deadline = phase, deadline

    def serve(self, service: Service) -> None:
        """Serve requests until one ends the connection (or the client does)."""
        observe = service.metrics.observe  # bound once, not per request
        log, access_line = self._server.log_line, self._server.access_line
        self._wait()
        # Entering WAITING, then checking closing_idle, pairs with drain(). A new
        # connection's first request is served even then: its client has sent it, or is
        # sending it, and with --workers another process took over the listening socket.
        while not (self._served and self._server.closing_idle):
            request, line, template, head, exchange = None, "", UNMATCHED, None, None
            started = None  # once the head is read: what the duration counts from
            try:
                head = self._read_head()
                if head is None:  # the client closed, or sent nothing in time
                    return
                self._enter(self.BUSY, None)
                started = time.perf_counter()
                line = request_line(head)
                request = parse_head(head)
                exchange = service.begin(request)
                template = exchange.template
                body = self._read_body(request, exchange.body_length) \
                    if exchange.body_length else b""
                reply = service.respond(exchange, body, self._client_gone)
                request_id, body_read = exchange.request_id, exchange.body_length > 0
            except ConnectionError:
                raise  # the client went away: nobody to answer
            except ClientGone:  # noticed before its reply was made: logged as nginx does
                seconds = time.perf_counter() - started
                log(access_line(self.client_address, line, CLIENT_GONE, 0, seconds,
                                exchange.request_id, request))
                observe(template, request.method, CLIENT_GONE, seconds)
                return
            except Exception as error:
                if started is None:  # the head was not read: the answer is all there is
                    started = time.perf_counter()
                origin = None
                if request is None and service.cors_origins:  # a script may read why
                    origin = lenient_origin(head) if head is not None else self._head_origin()
                # The client's X-Request-ID, if it can be read: in a head too long, not.
                request_id = exchange.request_id if exchange is not None else \
                    service.request_id(lenient_headers(head) if head is not None else {})
                reply = service.problem(error, request, line, origin, request_id)
                body_read = False
            method = request.method if request is not None else line.partition(" ")[0]
            keep_open = keep_alive(request, body_read, self._server.draining)
            apart = reply.body if method != "HEAD" and isinstance(reply.body, bytes) \
                and len(reply.body) >= SEND_APART_BYTES else None
            response, size = render_response(
                reply, request_id, keep_open=keep_open,
                head_only=method == "HEAD" or apart is not None,
                http_1_0=request is not None and request.version == "HTTP/1.0")
            seconds = time.perf_counter() - started
            log(access_line(self.client_address, line, reply.status, size, seconds, request_id,
                            request))  # never lost
            observe(template, method if method in KNOWN_METHODS else "other", reply.status,
                    seconds)
            self._send(response, keep_open, apart)
            if not keep_open:
                return

    # Reading and writing, for serve().

    def _read_head(self) -> Optional[bytes]:
        """The next request's head, as find_head() finds it; None when the client
        closed (or the wait ran out) before sending one."""
        searched = blank = 0
        while True:
            # Blank lines before the request line are ignored (RFC 9112 section 2.2): let
            # go as they come, so that each is searched once, however they trickle in.
            skipped = _BLANK_LINES.match(self._data).end() \
                if self._data and self._data[0] in b"\r\n" else 0  # the match only if needed
            if skipped:
                del self._data[:skipped]
                searched, blank = max(0, searched - skipped), blank + skipped
                if blank > MAX_HEAD_BYTES:
                    raise HTTPError(400, f"More than {MAX_HEAD_BYTES} bytes of blank lines "
                                         "came before a request line.")
            found = find_head(self._data, searched) if self._data else None  # nothing to search yet
            if found is not None:
                start, end = found
                head = bytes(self._data[start:end])
                del self._data[:end]
                return head
            searched = len(self._data)
            if not self._receive():
                if self._data.strip(b"\r\n"):
                    raise HTTPError(400, "The connection closed before the request's head "
                                         "ended; an empty line ends the headers.")
                return None

    def _head_origin(self) -> Optional[str]:
        """The Origin of a head too long to parse (414, 431) or cut short, if its first
        ORIGIN_SEARCH_BYTES hold one: in what arrived, then in what arrives of them
        within the request's deadline (after a long request line, say). Each piece is
        searched as it comes and let go, but for its last ORIGIN_LINE_BYTES; the
        connection, which closes after its answer, holds no more while it waits."""
        data, window, seen, origin = self._data, b"", 0, None
        with contextlib.suppress(HTTPError, OSError):
            while True:
                window += bytes(data[:ORIGIN_SEARCH_BYTES - seen])
                seen += len(data)
                del data[:]
                origin = lenient_origin(window)
                if origin is not None or _HEAD_END.search(window) or seen >= ORIGIN_SEARCH_BYTES:
                    break
                window = window[-ORIGIN_LINE_BYTES:]
                if not self._receive():
                    break
        return origin

    def _read_body(self, request: RequestHead, length: int) -> bytes:
        """The request's body of length bytes, within the request's deadline. Sends
        100 Continue first if the client waits for it: only now, so that a request
        refused on its headers is refused unread. A body that arrived with the head,
        as a small one mostly does, is taken at once: the connection stays BUSY."""
        if len(self._data) < length or expects_continue(request):
            self._enter(self.READING, self._request_deadline)
            if expects_continue(request):
                self._sock.sendall(CONTINUE)
            while len(self._data) < length:
                if not self._receive():
                    raise HTTPError(400, f"The body ended after {len(self._data)} of {length} "
                                         "bytes.")
            self._enter(self.BUSY, None)
        body = bytes(self._data[:length])
        del self._data[:length]  # what is left is the next request's
        return body

    def _client_gone(self) -> bool:
        """Whether the client has hung up (closed its side, or reset the connection)
        while its request was being handled: for a route, before it makes a large
        reply. It looks without taking what has arrived, and never waits."""
        try:
            return not self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:  # nothing has arrived: still there
            return False
        except OSError:
            return True

    def _receive(self) -> bool:
        """Read what the client sent next into _data; False at end of file. A
        request's first byte starts its deadline. Past a deadline: end of file while
        waiting, else a 408. Bytes that arrive just as close_if_idle() ends the wait
        (at shutdown) are a request begun: its client sent it before it could see the
        close, so it is answered."""
        chunk = self._sock.recv(RECEIVE_BYTES)
        if self._expired and not (chunk and self._phase == self.WAITING):
            if self._phase == self.WAITING:  # no request had begun: nothing to answer
                return False
            if self._expired == "closed":  # what came before the close is not the whole request
                raise HTTPError(503, "The server is shutting down, and stopped reading this "
                                     "request before it was whole; send it again.",
                                headers={"Retry-After": "1"})
            raise HTTPError(408, "The request did not arrive whole within "
                                 f"{self._limits.request_timeout:g} seconds.")
        if not chunk:
            return False
        if self._phase == self.WAITING:
            self._request_deadline = time.monotonic() + self._limits.request_timeout
            self._enter(self.READING, self._request_deadline)
        self._data += chunk
        return True

    def _wait(self, since: Optional[float] = None) -> None:
        """Wait for a request: from now, or from when the last response was sent. If
        some of it has arrived already (sent behind the last one), it is being read."""
        if self._data and self._data.strip(b"\r\n"):
            self._request_deadline = time.monotonic() + self._limits.request_timeout
            self._enter(self.READING, self._request_deadline)
            return
        self.waiting_since = time.monotonic() if since is None else since
        timeout = self._limits.idle_timeout if self._served else self._limits.first_byte_timeout
        self._enter(self.WAITING, self.waiting_since + timeout)

    def _send(self, response: bytes, keep_open: bool, body: Optional[bytes] = None) -> None:
        """Write a whole response (and the body that follows it, if given apart),
        within request_timeout. A connection kept open waits from when its response
        was handed to the kernel, not from when its thread next gets to run: then of
        two connections, the one answered first is the longer idle, and the first
        to make room (SchedulerServer._make_room)."""
        handed = time.monotonic()
        self._enter(self.WRITING, handed + self._limits.request_timeout)
        if body is None:
            self._sock.sendall(response)
        else:  # one gathering write at a time, never a copy of the body
            parts = [memoryview(response), memoryview(body)]
            while parts:
                sent = self._sock.sendmsg(parts)
                while parts and sent >= len(parts[0]):
                    sent -= len(parts.pop(0))
                if parts:
                    parts[0] = parts[0][sent:]
        self._served += 1
        if keep_open:
            self._wait(since=handed)

    def close(self) -> None:
        """Close without resetting: after our FIN, read for a moment what the client
        still sends, so its unread bytes do not make the kernel reset the connection
        and destroy the last response (for example a 413 sent before its body)."""
        self._enter(self.CLOSED, None)
        del self._data[:]  # what was read and not taken (a head refused, a next request)
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            drained = 0
            while drained < LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        self._sock.close()

    def refuse(self, service: Service, error: HTTPError) -> str:
        """Answer from the accepting thread, which must never block, and close; return
        the answer's X-Request-ID."""
        request_id = service.request_id({})
        try:
            self._sock.setblocking(False)
            received = b""
            with contextlib.suppress(BlockingIOError):  # take what the client sent, so
                received = self._sock.recv(65536)  # that closing does not reset the connection
            origin = None
            if service.cors_origins:  # and, if it has come, whose page sent it; else
                origin = lenient_origin(received)  # the one origin allowed, if one is
                if origin is None and len(service.cors_origins) == 1:
                    origin, = service.cors_origins
            given = lenient_headers(received)  # the client's X-Request-ID, if it came
            if given:
                request_id = service.request_id(given)
            reply = service.problem(error, origin=origin, request_id=request_id)
            self._sock.send(render_response(reply, request_id, keep_open=False)[0])  # it fits
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._sock.close()
        return request_id

    # For the server's other threads.

    def expire_if_late(self, now: float) -> bool:
        """For the watchdog: if the connection is past its deadline, end its blocked
        read (or write). Return True if this call did so."""
        with self._lock:
            if self._deadline is None or now < self._deadline or self._expired:
                return False
            self._expired = "deadline"
            # A late reader still gets its 408, so only a late writer loses both sides.
            self._shutdown(socket.SHUT_RDWR if self._phase == self.WRITING else socket.SHUT_RD)
            return True

    @property
    def phase(self) -> str:
        return self._phase

    def close_if_idle(self, keep_new: bool = False) -> bool:
        """For shutdown, or to make room: end the wait for another request with
        end-of-file, even if its first bytes are on their way (a client must be
        ready for that on a keep-alive connection: RFC 9112 section 9.3.1). Return
        True if it was waiting, and so is now closing. With keep_new, a connection
        still waiting for its first request is left alone (at shutdown, that
        request is answered)."""
        with self._lock:
            if self._phase != self.WAITING or (keep_new and not self._served):
                return False
            self._expired = "closed"
            self._shutdown(socket.SHUT_RD)
            return True

    def _shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):  # already closed
            self._sock.shutdown(how)


# --- Metrics shared by the workers -------------------------------------------------------
# With --workers, each process's numbers in a shared memory table (MetricsTable) that
# every worker reads to answer /metrics for all of them.


class MetricsTable:
    """The metrics of several worker processes (--workers), in memory they share: a
    file that has no name (memfd_create(), else an unlinked temporary file), which
    the supervisor makes and passes to each worker it starts as a descriptor (one
    that survives exec, for a worker that loads the code anew). Each worker process
    writes its numbers to a slot the supervisor gives it, and a scrape, whichever
    worker it reaches, adds up every slot. A process started in a slot after
    another ended there carries on from its counts, so counters never go down while
    the supervisor runs (as prometheus_client's multiprocess mode keeps a dead
    process's file). The supervisor writes its own samples, and what a health
    check tells of the workers (a note), to a slot of its own.

    No lock, since a process killed holding one would never release it. A slot is
    [generation][copy 0][copy 1]: a writer fills the copy of the next generation,
    then publishes that generation; a reader takes the copy of the generation it
    read, and reads again if the generation changed meanwhile. A writer killed
    halfway leaves the last whole copy in place. A copy is its header (_HEADER),
    the numbers as doubles, the layout's series (JSON: read only by a process
    that lays them out otherwise), and the samples and the note (JSON, a few
    hundred bytes)."""

    # A copy holds at worst (every status of every route and method) 1 MB; in use,
    # 12 KiB. Pages untouched cost no memory.
    COPY_BYTES = 2 << 20
    _HEADER = struct.Struct("<QQQQQ")  # generation, digest, lengths of numbers, series, samples

    def __init__(self, slots: int, fd: Optional[int] = None):
        """A new table of slots, or, given the descriptor fd of one (its fd), that table."""
        self.slots = slots
        self._slot_bytes = 8 + 2 * self.COPY_BYTES
        size = slots * self._slot_bytes
        if fd is None:
            if hasattr(os, "memfd_create"):  # Linux: memory, not a file on a disk
                fd = os.memfd_create("scheduler-metrics")
            else:  # imported here, not above: every start would pay for it, on Linux for nothing
                import tempfile
                with tempfile.TemporaryFile() as file:  # removed from its directory at once
                    fd = os.dup(file.fileno())
            os.ftruncate(fd, size)  # pages never written cost nothing
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"the metrics table behind descriptor {fd} is not of {slots} slots")
        self.fd = fd
        self._map = mmap.mmap(fd, size)  # MAP_SHARED: every process that maps fd sees one table
        self._layouts: Dict[int, SeriesLayout] = {}  # by digest: the layouts read so far
        self._written: Dict[int, Tuple[int, bytes]] = {}  # slot -> this process's last write

    def generation(self, slot: int) -> int:
        """The generation of the slot's last write (0: none yet); it grows with each."""
        return struct.unpack_from("<Q", self._map, slot * self._slot_bytes)[0]

    def put(self, slot: int, layout: SeriesLayout, numbers, samples: dict,
              note: object = None) -> bool:
        """Publish a worker's numbers and samples, and a note, anything JSON holds
        (unless the slot holds them already); False if they do not fit (they always
        should)."""
        payload = array.array("d", numbers).tobytes()
        tail = json.dumps([samples, note], separators=(",", ":")).encode()
        body = payload + layout.keys + tail
        if len(body) > self.COPY_BYTES - self._HEADER.size:
            return False
        base = slot * self._slot_bytes
        generation = self.generation(slot)
        if self._written.get(slot) == (generation, body):  # a scrape in a quiet moment
            return True
        self._layouts.setdefault(layout.digest, layout)  # what a read of this layout gives
        generation += 1
        copy = base + 8 + (generation % 2) * self.COPY_BYTES
        self._HEADER.pack_into(self._map, copy, generation, layout.digest, len(payload),
                               len(layout.keys), len(tail))
        self._map[copy + self._HEADER.size:copy + self._HEADER.size + len(body)] = body
        struct.pack_into("<Q", self._map, base, generation)  # now readers take this copy
        self._written[slot] = (generation, body)
        return True

    def read(self, slot: int) -> Optional[Reading]:
        """A worker's last published numbers; None if it has published none."""
        base = slot * self._slot_bytes
        for _ in range(1000):  # a writer publishes every TICK at most: a retry is rare
            generation = self.generation(slot)
            if generation == 0:
                return None
            copy = base + 8 + (generation % 2) * self.COPY_BYTES
            written, digest, numbers, keys, samples = self._HEADER.unpack_from(self._map, copy)
            start = copy + self._HEADER.size
            body = self._map[start:start + numbers + keys + samples]
            if written == generation == self.generation(slot):
                break
        else:
            return None
        layout = self._layouts.get(digest)
        if layout is None:
            layout = SeriesLayout(tuple(key) for key in json.loads(body[numbers:numbers + keys]))
            self._layouts[digest] = layout
        values = array.array("d")
        values.frombytes(body[:numbers])
        return Reading(generation, layout, values, *json.loads(body[numbers + keys:]))

    def retire(self, slot: int) -> None:
        """For the supervisor, when a worker has died: its gauges no longer count
        (its connections are gone); its counters stay, for the next to carry on."""
        reading = self.read(slot)
        if reading is not None:
            for sample in reading.samples.values():
                if sample[0] == "gauge":
                    sample[2] = 0
            self.put(slot, reading.layout, reading.numbers, reading.samples, reading.note)


# --- Server ---------------------------------------------------------------------------

TICK = 0.1  # seconds between the watchdog's checks of deadlines, and between log writes
DRAIN_GRACE = 1.0  # seconds a worker's keep-alive connections may still send a request
LOG_BACKLOG_BYTES = 1 << 20  # characters of log lines kept unwritten; past it, the oldest go
LOG_CLOSE_SECONDS = 1.0  # how long closing waits for the log's reader to take the last lines
ACCEPT_BACKOFF = 0.1  # seconds between tries when accept() finds no descriptor or memory
# accept() errors that say the process or system is out of something, not the client.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Log:
    """Lines for a stream (the access log and errors), written out every TICK by a
    thread of its own: a write per request would cost a system call, and so a GIL
    hand-off, and a reader that stops reading must not stop the server. While
    the stream does not take them, lines wait, up to LOG_BACKLOG_BYTES; past that
    the oldest are dropped, and counted."""

    def __init__(self, stream: Optional[TextIO]):
        self.stream = stream
        self.dropped = 0  # lines dropped so far
        self._lock = threading.Lock()  # guards _lines, _size and dropped
        self._lines: Deque[str] = collections.deque()
        self._size = 0  # characters in _lines
        self._flush_lock = threading.Lock()  # one batch at a time, in order
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write, name="log writer", daemon=True)

    def start(self) -> None:
        self._writer.start()

    def add(self, line: str) -> None:
        if self.stream is None:
            return
        with self._lock:
            self._lines.append(line + "\n")
            self._size += len(line) + 1
            while self._size > LOG_BACKLOG_BYTES and len(self._lines) > 1:
                self._size -= len(self._lines.popleft())
                self.dropped += 1

    def flush(self) -> None:
        """Write out the lines logged so far (blocking while the stream does)."""
        with self._flush_lock:
            with self._lock:
                lines, self._lines, self._size = self._lines, collections.deque(), 0
            if lines:
                self.stream.write("".join(lines))
                self.stream.flush()

    def _write(self) -> None:
        while not self._closing.wait(TICK):
            self.flush()
        if self.dropped:
            self.add(f"{self.dropped} log line(s) were dropped: the log's reader did not "
                       "keep up.")
        self.flush()

    def close(self, timeout: float = LOG_CLOSE_SECONDS) -> bool:
        """Write what is left, with how many lines were dropped; False if the stream
        has not taken it all within timeout seconds (its reader is stuck)."""
        self._closing.set()
        if self._writer.is_alive():
            self._writer.join(timeout)
        return not self._writer.is_alive()


def text_message(message: str, fields: dict) -> str:
    """A message for the text log: as it is, with a traceback after it (fields' other
    members are for the JSON log; what matters of them, the message says)."""
    traceback = fields.get("traceback")
    return message if traceback is None else f"{message}\n{traceback}"


def json_message(message: str, fields: dict) -> str:
    """A message for the JSON log: an object on one line, fields among its members."""
    return _LOG_ENCODER.encode({"time": utc_timestamp(), "message": message, **fields})


LOG_FORMATS = {"text": text_message, "json": json_message}  # --log-format; ACCESS_LOG_LINES too


def address_family(host: str) -> int:
    """The socket family for a host to listen on: IPv6 for an address with colons."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def url_of(address: tuple) -> str:
    """The URL of a listening socket's address, an IPv6 one in brackets."""
    host, port = address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SchedulerServer(ThreadingHTTPServer):
    """A threading HTTP server that carries what every connection shares (the
    store, the limits, the log), caps the connections it serves at once, enforces
    their deadlines, and drains them on shutdown.

    Hooks of socketserver it overrides:
        get_request()       accepts a Connection: the "request", from accept to close
        process_request()   takes a slot for it and starts its thread, or refuses it
        finish_request()    serves it (Connection.serve()): RequestHandlerClass is
                            Connection, made already, and never called
        shutdown_request()  closes it and gives back its slot
        handle_error()      logs what ended it
        server_close()      also stops the watchdog and the log's thread

    What it keeps of ThreadingHTTPServer: the listening socket (server_bind(),
    which also records the server's name), serve_forever() and shutdown(), and a
    thread per connection. Not its request handler, BaseHTTPRequestHandler: that
    reads a head line by line from a file object, with one socket timeout for each
    read rather than a deadline for the whole request, and answers errors in HTML;
    Connection reads and writes HTTP/1.1 itself (RFC 9112), with a deadline on every
    wait and a problem+json for every error (RFC 9457).
    """

    daemon_threads = True  # a connection still open after drain() must not block exit
    request_queue_size = 128  # listen backlog; the default 5 drops bursts of connects

    def __init__(self, address, service: Service, log_stream: Optional[TextIO],
                 listener: Optional[socket.socket] = None, log_format: str = "text"):
        self.service = service
        self.store, self.limits = service.store, service.limits  # for short
        self.log_stream = log_stream
        self.draining = False  # set once by drain(): finish current requests, take no more
        self.closing_idle = False  # set once by drain(), after its grace: close idle ones
        self.parent = None  # a worker's supervisor (process ID): without it, shut down
        self._lock = threading.Lock()  # guards _connections
        self._all_closed = threading.Condition(self._lock)
        self._connections = set()  # those being served: at most limits.max_connections
        self.log_complete = True  # false once closing found the log's reader stuck
        self._accept_failing = False  # accept() is out of resources; logged once
        self._log = Log(log_stream)  # a thread of its own: a stuck log stops no deadline
        self.log_line = self._log.add  # log_line(line): bound once, for a call less a request
        self.access_line = ACCESS_LOG_LINES[log_format]  # a request's line, for log_line()
        self._message = LOG_FORMATS[log_format]
        service.log = self.log
        # Counted under _lock, for /metrics: connections refused at the cap, closed to
        # make room, and cut off by the watchdog past a deadline.
        self.refused = self.evicted = self.timed_out = 0
        service.metrics.process_collectors.append(self._connection_metrics)
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self.address_family = address_family(address[0])
        super().__init__(address, Connection, bind_and_activate=listener is None)
        if listener is not None:  # on a failure to bind, server_close() has been called
            self.socket.close()
            self.socket, self.server_address = listener, listener.getsockname()
        self._watchdog.start()
        self._log.start()

    @property
    def url(self) -> str:
        return url_of(self.server_address)

    def log(self, message: str, **fields) -> None:
        """Log a line for the operator: message, and fields that say more (in text,
        a traceback after it; in JSON, members beside it)."""
        self._log.add(self._message(message, fields))

    def _watch(self) -> None:
        """The watchdog: every tick, cut off connections past their deadline (and, in
        a worker, notice when its supervisor is gone, as gunicorn's workers do). A
        tick is a tenth of the shortest timeout, and TICK at most."""
        limits = self.limits
        tick = min(TICK, limits.request_timeout / 10, limits.idle_timeout / 10,
                   limits.first_byte_timeout / 10)
        while not self._closed.wait(tick):
            if self.parent is not None and os.getppid() != self.parent:  # orphaned
                self.parent = None
                self.log("The supervisor is gone: shutting down.")
                threading.Thread(target=self.shutdown, daemon=True).start()
            self.service.metrics.publish()  # with --workers, for the others' scrapes
            now = time.monotonic()
            with self._lock:
                connections = list(self._connections)
            expired = sum(connection.expire_if_late(now) for connection in connections)
            if expired:
                with self._lock:
                    self.timed_out += expired

    def server_close(self) -> None:
        """Stop accepting; then stop the watchdog, and write out the log unless its
        reader is stuck (then log_complete is false)."""
        super().server_close()
        self._closed.set()
        if self._watchdog.is_alive():
            self._watchdog.join()
        self.log_complete = self._log.close()

    def get_request(self) -> Tuple[Connection, tuple]:
        """Accept a connection. When the process is out of descriptors (or memory),
        wait a moment before the next try, instead of retrying at once forever, and
        say so once; new clients wait in the listen backlog meanwhile."""
        try:
            sock, client_address = self.socket.accept()
        except OSError as error:
            if error.errno in _OUT_OF_RESOURCES:
                if not self._accept_failing:
                    self._accept_failing = True
                    self.log(f"Cannot accept connections: {error.strerror}; retrying every "
                             f"{ACCEPT_BACKOFF:g} s (raise ulimit -n, or lower --max-connections).")
                time.sleep(ACCEPT_BACKOFF)
            raise  # socketserver then returns to wait for the next connection
        if self._accept_failing:
            self._accept_failing = False
            self.log("Accepting connections again.")
        return Connection(sock, client_address, self), client_address

    def process_request(self, connection: Connection, client_address) -> None:
        """Serve the connection in a thread of its own. At the cap, make room by
        closing the longest idle connection; if none is idle, refuse it with a 503
        from this thread, so that a flood cannot grow the threads."""
        with self._lock:
            admitted = len(self._connections) < self.limits.max_connections or self._make_room()
            if admitted:
                self._connections.add(connection)
            else:
                self.refused += 1
        if admitted:
            super().process_request(connection, client_address)
            return
        cap = self.limits.max_connections
        request_id = connection.refuse(self.service, HTTPError(
            503, f"The server is serving its maximum of {cap} connections; retry shortly.",
            headers={"Retry-After": "1"}))
        self.log(f"{client_address[0]} - - refused: {cap} connections open; 503 {request_id}",
                 client=client_address[0], status=503, request_id=request_id)

    def finish_request(self, connection: Connection, client_address) -> None:
        connection.serve(self.service)

    def _make_room(self) -> bool:
        """At the cap, close the connection that has waited longest for a request, and
        give its slot to a new one (its thread ends as soon as it sees the close).
        False when every connection is busy with a request."""
        idle = [c for c in self._connections if c.phase == Connection.WAITING]
        for connection in sorted(idle, key=lambda c: c.waiting_since):
            if connection.close_if_idle():
                self._connections.discard(connection)
                self.evicted += 1
                self.log(f"{connection.client_address[0]} - - closed after waiting longest, "
                         f"to make room: {self.limits.max_connections} connections open")
                return True
        return False

    def _connection_metrics(self) -> List[Sample]:
        with self._lock:
            phases = [connection.phase for connection in self._connections]
            return [("scheduler_connections_open", "gauge",
                     "Connections being served (by every worker, with --workers).",
                     len(phases)),
                    ("scheduler_connections_waiting", "gauge",
                     "Connections waiting for a request: a new one's first, or the next one "
                     "(the longest waiting is closed to make room at the cap).",
                     phases.count(Connection.WAITING)),
                    ("scheduler_connections_reading", "gauge",
                     "Connections reading a request, its head or its body.",
                     phases.count(Connection.READING)),
                    ("scheduler_connections_refused_total", "counter",
                     "Connections refused with a 503: all were busy at the cap.", self.refused),
                    ("scheduler_connections_evicted_total", "counter",
                     "Idle connections closed to make room at the cap.", self.evicted),
                    ("scheduler_connections_timed_out_total", "counter",
                     "Connections cut off past a deadline (first byte, idle, request).",
                     self.timed_out),
                    ("scheduler_log_lines_dropped_total", "counter",
                     "Log lines dropped because the log's reader did not keep up.",
                     self._log.dropped)]

    def shutdown_request(self, connection: Connection) -> None:
        """Close the connection and give back its slot."""
        try:
            connection.close()
        finally:
            with self._lock:
                self._connections.discard(connection)
                self._all_closed.notify_all()

    def handle_error(self, request, client_address) -> None:
        """Log what ended a connection, instead of socketserver's traceback on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client reset, or stalled while we wrote
            self.log(f"{client_address[0]} - - connection dropped: {error!r}")
        else:
            self.log(f"Unexpected error serving {client_address[0]}:", client=client_address[0],
                     traceback=traceback.format_exc())

    def drain(self, timeout: float, grace: float = 0.0) -> int:
        """Stop accepting, let requests in flight finish, close idle keep-alive
        connections, and wait up to timeout seconds for every connection to close;
        return how many are still open. Call after serve_forever() has returned, and
        server_close() after this.

        Each response from now on closes its connection. For grace seconds (or
        until none is open) a keep-alive connection may still send its next
        request: a busy client's is on its way, and closing under it would leave it
        unanswered (RFC 9112 section 9.3.1 allows that, but the client must then
        retry it); then those idle are closed. Worth it where another process
        serves on (a worker). A new connection is answered its first request,
        within its deadlines. (A connection enters WAITING, then checks
        closing_idle; this sets closing_idle, then closes those WAITING: each
        sees one.)"""
        self.socket.close()  # stop accepting; the watchdog keeps running
        deadline = time.monotonic() + timeout
        with self._lock:
            self.draining = True
            self.log(f"No longer accepting connections; letting {len(self._connections)} open "
                     f"connection(s) finish their requests (up to {timeout:g} seconds).")
            self._all_closed.wait_for(lambda: not self._connections, min(grace, timeout))
            self.closing_idle = True
            for connection in self._connections:
                connection.close_if_idle(keep_new=True)
            self._all_closed.wait_for(lambda: not self._connections,
                                      max(0.0, deadline - time.monotonic()))
            return len(self._connections)


# --- Command line ---------------------------------------------------------------------


def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, store=None, *,
                log_stream: Optional[TextIO] = sys.stderr, limits: Optional[Limits] = None,
                cors_origins: Tuple[str, ...] = (), listener: Optional[socket.socket] = None,
                log_format: str = "text") -> SchedulerServer:
    """Build a bound server (port 0 picks a free port); the caller runs serve_forever().

    store defaults to a new InMemoryStore, limits to Limits(). log_stream gets one
    access-log line a request and the tracebacks of unexpected errors; None
    silences it; log_format says how it is written ("text" or "json": LOG_FORMATS).
    cors_origins: the origins whose scripts may call the API ("*": any).
    listener: a listening socket to serve instead of binding one (several
    processes share it with --workers). Raises OSError when the address cannot
    be bound.
    """
    service = Service(store if store is not None else InMemoryStore(), limits, cors_origins)
    return SchedulerServer((host, port), service, log_stream, listener, log_format)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return port


def _cpu(text: str):
    if text in ("auto", "any"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a CPU number, 'auto' or 'any'")


_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")  # a name, in ASCII


def _origin(text: str) -> str:
    """An origin as a browser sends it in Origin, or "*". A browser sends the
    origin's serialization (the URL standard's): scheme://host[:port], in lower
    case, the host in ASCII (an international name as punycode, xn--...) and an
    IP address in its one written form (127.0.0.1, [::1]), the port left out when
    it is the scheme's default; nothing after. Any other form could never equal
    what a browser sends, so it is refused rather than taken."""
    if text == "*":
        return text
    scheme, separator, host = text.partition("://")
    port = None
    if ":" in host and not host.endswith("]"):  # "[::1]" is a host without a port
        host, _, port = host.rpartition(":")
    port_as_sent = port is None or (port.isascii() and port.isdigit() and port[0] != "0"
                                    and int(port) <= 65535
                                    and int(port) != _DEFAULT_PORTS.get(scheme))
    if separator and scheme in _DEFAULT_PORTS and port_as_sent and _host_as_sent(host):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an origin as a browser sends it: give scheme://host[:port] in lower "
        "case, with the host in ASCII (punycode for other names), an IP address as "
        "127.0.0.1 or [::1], no default port (80, 443) and no path or trailing slash (e.g. "
        "https://app.example.com), or *")


def _host_as_sent(host: str) -> bool:
    """Whether host is written as a browser writes it in an origin: a name in lower
    case ASCII, or an IP address in its one form. A name whose last label is a
    number is an IPv4 address to a browser (the URL standard), which writes it
    as four decimal numbers: 127.1 is sent as 127.0.0.1."""
    try:
        if host.startswith("[") and host.endswith("]"):
            return _ipv6_as_sent(int(ipaddress.IPv6Address(host[1:-1]))) == host[1:-1]
        if host.rstrip(".").rpartition(".")[2].isdigit():
            return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False
    return bool(_ORIGIN_HOST.fullmatch(host))


def _ipv6_as_sent(address: int) -> str:
    """An IPv6 address as the URL standard writes it: eight pieces in hexadecimal,
    the first longest run of two or more zero pieces as "::" (an IPv4-mapped one
    too, which Python 3.13's ipaddress writes with its last 32 bits dotted)."""
    pieces = [address >> shift & 0xFFFF for shift in range(112, -1, -16)]
    best, length = None, 1
    for start in range(8):
        run = next((end for end in range(start, 8) if pieces[end]), 8) - start
        if run > length:
            best, length = start, run
    written = [f"{piece:x}" for piece in pieces]
    if best is None:
        return ":".join(written)
    return ":".join(written[:best]) + "::" + ":".join(written[best + length:])


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value
    return parse


_LIMIT_OPTIONS = {  # Limits field: (metavar, help)
    "max_body_bytes": ("N", "largest request body accepted; larger gets 413"),
    "request_timeout": ("SECONDS", "time for a whole request (line, headers, body) to arrive; "
                                   "slower gets 408 and is closed"),
    "idle_timeout": ("SECONDS", "time a keep-alive connection may wait for its next request"),
    "first_byte_timeout": ("SECONDS", "time a new connection may take to send its first byte"),
    "max_connections": ("N", "connections served at once (per worker); past it the one "
                             "idle longest is closed, or if none is idle, 503 with Retry-After"),
    "shutdown_timeout": ("SECONDS", "on SIGTERM or Ctrl-C, time in-flight requests get to "
                                    "finish"),
    "max_appointments": ("N", "appointments stored at most, over all users; more get 507 "
                              "(the memory they take: the README's Limits)"),
    "max_appointments_per_user": ("N", "appointments one user may hold, past ones included; "
                                       "more get 409"),
    "max_idempotency_keys": ("N", "Idempotency-Keys kept at most, over all users (each for 24 "
                                  "hours); a new one past it gets 503, once no key of a request "
                                  "that changed nothing can make room"),
    "max_idempotency_keys_per_user": ("N", "Idempotency-Keys one user may hold; past it, "
                                           "429 likewise"),
}
# Workers at most, for each CPU the process may use: a worker is an interpreter of its
# own, and runs Python on one CPU at a time (the GIL); a few a CPU cover the time each
# waits for the disk, and more only add memory and start-up time.
WORKERS_PER_CPU = 4


def usable_cpus() -> int:
    """How many CPUs this process may run on: its affinity where there is one (Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    most_workers = WORKERS_PER_CPU * usable_cpus()
    parser = argparse.ArgumentParser(
        description="Appointment scheduler: an HTTP JSON API for booking "
                    f"{length_in_words()} appointments (UTC). Logs one line per request to "
                    "stderr. Ctrl-C or SIGTERM stops it gracefully; a second one stops it at "
                    "once. SIGHUP: "
                    "with --workers, replaces the workers one at a time with processes that "
                    "load the code anew (a deploy without downtime); a lone server logs it "
                    "and serves on.")
    parser.add_argument("--version", action="version", version=f"scheduler {__version__}",
                        help="print the version (the Server header's and /openapi.json's) "
                             "and exit")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=_port, default=None,
                        help=f"port to listen on; 0 picks a free one (default: $PORT, "
                             f"else {DEFAULT_PORT})")
    parser.add_argument("--cpu", type=_cpu, default="auto",
                        help="run on this one CPU (Linux): 'auto' picks one of those allowed "
                             "by process ID, 'any' lets the threads run on every CPU "
                             "(default: %(default)s: with the GIL, threads hand over to one "
                             "another faster on one CPU; see the README)")
    parser.add_argument("--workers", type=_positive(int), default=1, metavar="N",
                        help="server processes sharing the listening socket, each on a CPU of "
                             "its own with --cpu auto; more than 1 needs --db; at most "
                             f"{WORKERS_PER_CPU} per CPU this process may use ({most_workers} "
                             "here) (default: 1)")
    parser.add_argument("--db", metavar="PATH|URI",
                        help="keep appointments in this SQLite file (created if missing), "
                             "so they survive restarts, or in the PostgreSQL database of a "
                             "postgresql:// URI (its password may come from PGPASSWORD), "
                             "which several servers may share; without it they live in memory")
    parser.add_argument("--cors-origin", type=_origin, action="append", default=[],
                        metavar="ORIGIN", dest="cors_origins",
                        help="let web pages from this origin (e.g. https://app.example.com) "
                             "call the API from a browser; repeat for more; * for any "
                             "(default: none)")
    parser.add_argument("--log-format", choices=list(LOG_FORMATS), default="text",
                        help="how stderr's log is written: text, a line a request as "
                             "http.server writes it, then the request's duration in "
                             "microseconds (from its head read to its response ready to "
                             "send) and its X-Request-ID; or json, an object a line (time, "
                             "client, method, target, protocol, status, bytes, duration_us, "
                             "request_id, user_agent), and every other line an object too "
                             "(time, message; a traceback, a request_id) (default: "
                             "%(default)s)")
    limits = parser.add_argument_group("limits")
    for name, (metavar, description) in _LIMIT_OPTIONS.items():
        default = getattr(Limits(), name)
        limits.add_argument("--" + name.replace("_", "-"), type=_positive(type(default)),
                            default=default, metavar=metavar,
                            help=f"{description} (default: {default:g})")
    args = parser.parse_args(argv)
    if args.db == "":  # an unset variable in a unit file: memory would lose every booking
        parser.error("--db needs a file name (it was given an empty one); leave --db out "
                     "to keep appointments in memory")
    args.postgres = None
    if args.db and is_postgres_uri(args.db):
        try:
            args.postgres = parse_postgres_uri(args.db)
        except ValueError as error:
            parser.error(f"--db: {error}")
    if args.workers > most_workers:
        parser.error(f"--workers {args.workers} is more than this machine can use: at most "
                     f"{WORKERS_PER_CPU} per CPU this process may use, so {most_workers} here; "
                     "each worker is an interpreter of its own, which runs Python on one CPU "
                     "at a time, and more add memory and start-up time, not throughput")
    if args.workers > 1 and not args.db:
        parser.error("--workers above 1 needs --db: each process would keep appointments of "
                     "its own in memory, and each allow one per user and date")
    if args.workers > 1 and isinstance(args.cpu, int):
        parser.error("--cpu N is for one process; with --workers use --cpu auto (a CPU each) "
                     "or any")
    if args.port is None:
        try:
            args.port = _port(os.environ.get("PORT", str(DEFAULT_PORT)))
        except argparse.ArgumentTypeError as error:
            parser.error(f"PORT environment variable: {error}")
    return args


def pin_to_one_cpu(choice) -> Optional[int]:
    """Keep this process, and the threads it starts from now on, on one CPU; return
    it, or None where threads may run anywhere. Raises OSError for a CPU that
    cannot be used. Only one thread runs Python at a time (the GIL), and a request
    hands it between threads twice, which is much slower when the threads are on
    different CPUs (README, Performance)."""
    if choice == "any" or not hasattr(os, "sched_setaffinity"):  # macOS has no affinity
        if isinstance(choice, int):
            raise OSError(f"this system cannot pin a process to CPU {choice}")
        return None
    if choice == "auto":
        allowed = sorted(os.sched_getaffinity(0))
        choice = allowed[os.getpid() % len(allowed)]  # several servers spread out
    os.sched_setaffinity(0, {choice})
    return choice


DESCRIPTOR_RESERVE = 32  # for stdio, the listening socket, SQLite's files, a refused client...


def fit_to_descriptors(max_connections: int) -> int:
    """The connection cap that the process's open-file limit (ulimit -n) allows: each
    connection holds a descriptor. Raises the soft limit toward what the cap needs,
    as far as the hard limit lets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + DESCRIPTOR_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):  # macOS may refuse past OPEN_MAX
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - DESCRIPTOR_RESERVE))


def main(argv: Optional[List[str]] = None) -> int:
    global _say_format
    # A SIGHUP ends a process that has no handler for it. Until serve() or the
    # Supervisor sets theirs, one that comes while the store opens (an upgrade may
    # take a while) is ignored: the code it would have reloaded is being loaded.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = parse_args(argv)
    _say_format = LOG_FORMATS[args.log_format]
    limits = Limits(**{name: getattr(args, name) for name in Limits._fields})
    limits = limits._replace(max_connections=fit_to_descriptors(args.max_connections))
    worker = os.environ.pop(WORKER_VARIABLE, None)
    if worker is not None:  # a process a Supervisor started
        return run_worker(args, limits, worker)
    if args.workers > 1:
        return Supervisor(args, limits, sys.argv[1:] if argv is None else list(argv)).run()
    try:
        cpu = pin_to_one_cpu(args.cpu)  # before any thread starts: threads inherit it
    except OSError as error:
        say(f"scheduler: cannot run on CPU {args.cpu}: {error.strerror or error}")
        return 1
    return serve(args, limits, cpu)


_say_format = text_message  # how say() writes: main() sets it from --log-format


def flush_output() -> None:
    """Write out what stdout and stderr hold, as exiting would; one that has gone
    (closed, or a terminal hung up) loses it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def say(line: str) -> None:
    """A line for the operator, on stderr at once (outside a server's own log). A
    stderr that has gone (a terminal hung up) loses the line, and stops nothing."""
    with contextlib.suppress(OSError):
        print(_say_format(line, {}), file=sys.stderr, flush=True)


def open_store(args: argparse.Namespace, limits: Limits) -> Optional[Store]:
    """The store the options ask for, or None, having said why it cannot be opened."""
    quotas = {"max_keys": limits.max_idempotency_keys,
              "user_capacity": limits.max_appointments_per_user,
              "max_keys_per_user": limits.max_idempotency_keys_per_user}
    try:
        if args.postgres is not None:
            return PostgresStore(args.postgres, limits.max_appointments, **quotas)
        return (SQLiteStore(args.db, limits.max_appointments, **quotas) if args.db
                else InMemoryStore(limits.max_appointments, **quotas))
    except sqlite3.Error as error:
        say(f"scheduler: cannot open the database {args.db}: {error}")
    except (PGConnectionError, SchemaRefused) as error:  # each names the host or schema
        say(f"scheduler: cannot use PostgreSQL: {error}")
    except PGError as error:  # the server's words, never the password, nor SQL text
        say(f"scheduler: cannot use PostgreSQL at {args.postgres.redacted_uri}: {error} "
            f"(SQLSTATE {error.sqlstate})")
    return None


def cannot_listen(args: argparse.Namespace, error: OSError) -> str:
    return f"scheduler: cannot listen on {args.host}:{args.port}: {error.strerror}"


# The signals that stop or reload a server or its Supervisor.
CONTROL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a Supervisor sends its workers to have them drain and stop: not SIGTERM, which
# a worker may get from the operator too, at the same moment, when it goes to the
# whole process group (systemd's KillMode=control-group, kill -- -PGID). The
# supervisor's would then be the worker's second, which stops it at once.
DRAIN_SIGNAL = signal.SIGUSR1
# A Supervisor blocks these while it starts a worker, which unblocks them once its
# handlers are set (serve()): until then their default would end it.
WORKER_SIGNALS = CONTROL_SIGNALS + (DRAIN_SIGNAL,)


def serve(args: argparse.Namespace, limits: Limits, cpu: Optional[int],
          listener: Optional[socket.socket] = None, name: str = "",
          parent: Optional[int] = None,
          metrics: Optional[Tuple[MetricsTable, int, int]] = None,
          ready: Optional[int] = None) -> int:
    """One server process's life: open the store, serve until SIGTERM or Ctrl-C,
    drain, close. listener, name, parent, metrics and ready: a worker's shared
    socket, its name, its supervisor's process ID, the table of its metrics with
    its slot and the supervisor's, and the pipe on which it says it is ready."""
    # The log goes to stderr through a block buffer, flushed by the server's
    # log writer thread every TICK, rather than stderr's own flush at every line.
    log_stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",
                      errors="backslashreplace", closefd=False)
    store = open_store(args, limits)
    if store is None:
        return 1
    try:
        server = make_server(args.host, args.port, store, limits=limits, log_stream=log_stream,
                             cors_origins=tuple(args.cors_origins), listener=listener,
                             log_format=args.log_format)
    except OSError as error:
        say(cannot_listen(args, error))
        store.close()
        return 1
    if metrics is not None:
        server.service.metrics.share(*metrics)
    signals, reasons = [], []  # the stop signals received; why it stops (the first reason)

    def stop(signum, frame):
        if signals:  # the second: stop now, whatever is unwritten or unfinished
            os._exit(1)
        signals.append(signum)
        stopping(f"{signal.Signals(signum).name} received")

    def drain(signum, frame):  # the supervisor's DRAIN_SIGNAL: never counted as a stop signal
        stopping("Asked by the supervisor to stop")

    def stopping(reason: str) -> None:
        if not reasons:
            reasons.append(reason)
            # serve_forever() runs in this thread and shutdown() waits for it to return.
            threading.Thread(target=server.shutdown, daemon=True).start()

    def hang_up(signum, frame):  # logs from another thread: this one may hold the log's lock
        line = "SIGHUP received: serving on (the log is stderr: there is no file to reopen)."
        threading.Thread(target=server.log, args=(line,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if parent is None:
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hang_up)
    else:  # Ctrl-C and SIGHUP are the Supervisor's: a terminal sends them to every
        # process in its group, and a worker would take a second Ctrl-C for its own
        # second signal (stop at once) while the supervisor still lets it drain.
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(DRAIN_SIGNAL, drain)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # a worker starts with them blocked
    server.parent = parent
    if listener is None:
        print(f"Listening on {server.url} (Ctrl-C to stop)", flush=True)
    where = "any CPU" if cpu is None else f"CPU {cpu} (--cpu any lets the threads run on every CPU)"
    who = f"{name.capitalize()} running" if name else "Running"
    server.log(f"{who} on {where}.")
    if not name:  # a worker's supervisor has logged them
        for notice in store.notices:
            server.log(notice)
    if limits.max_connections < args.max_connections:
        server.log(f"Serving at most {limits.max_connections} connections, not "
                   f"{args.max_connections}: the process may open "
                   f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]} files (ulimit -n).")
    if ready is not None:  # the supervisor may now stop the process this one replaces
        with contextlib.suppress(OSError):
            os.write(ready, b"1")
        os.close(ready)
    server.serve_forever(poll_interval=0.1)  # how soon shutdown() is noticed
    if reasons:
        server.log(f"{reasons[0]}: shutting down.")
    # A worker's clients have another worker to go to: their next request is answered
    # (with Connection: close) rather than lost. A lone server's would be refused.
    still_open = server.drain(limits.shutdown_timeout, DRAIN_GRACE if parent else 0.0)
    server.log(f"Stopped; {still_open} connection(s) cut off." if still_open else "Stopped.")
    server.server_close()
    server.service.metrics.publish()  # the last counts, for the other workers' scrapes
    store.close()
    if not server.log_complete:  # exiting would flush stderr, and wait for its reader
        os._exit(0)
    return 0


# How a Supervisor tells a process it starts that it is a worker, and which: JSON
# naming its number, the descriptors passed to it, its metrics slots and its CPU.
WORKER_VARIABLE = "SCHEDULER_WORKER"


def run_worker(args: argparse.Namespace, limits: Limits, setting: str) -> int:
    """A worker's life, in a process a Supervisor started with setting in
    WORKER_VARIABLE: serve() on the listening socket and the metrics table it was
    passed, and say when it is ready on the pipe it was passed."""
    try:
        worker = json.loads(setting)
        listener = socket.socket(fileno=worker["listener"])
        table = MetricsTable(worker["slots"], worker["metrics"])
        cpu = pin_to_one_cpu(worker["cpu"]) if worker["cpu"] is not None else None
    except (ValueError, KeyError, TypeError, OSError) as error:
        say(f"scheduler: cannot start as a worker ({error}): {WORKER_VARIABLE} is for the "
            "processes a supervisor starts; unset it")
        return 1
    listener.setblocking(False)  # workers race to accept: those that lose must not wait
    return serve(args, limits, cpu, listener, f"worker {worker['number']}", worker["supervisor"],
                 (table, worker["slot"], worker["slots"] - 1), worker["ready"])


# Restarting a worker that dies: at once the first time, then, while it keeps dying
# within WORKER_YOUNG seconds of starting, after twice the last wait, up to the most.
# CRASH_LOOP deaths in a row make it failing (in /healthz and /metrics) until a new
# process of it is ready. A worker not ready READY_SECONDS after its start is killed.
WORKER_BACKOFF, WORKER_BACKOFF_MOST, WORKER_YOUNG = 0.1, 10.0, 10.0
CRASH_LOOP, READY_SECONDS = 2, 60.0


class WorkerProcess:
    """A worker process that a Supervisor started and has not yet reaped."""

    def __init__(self, number: int, slot: int, pid: int, ready_fd: int, generation: int,
                 replaces: Optional[int]):
        self.number, self.slot, self.pid = number, slot, pid
        self.started = time.monotonic()
        self.ready_fd: Optional[int] = ready_fd  # its readiness pipe, until it has spoken
        self.ready = False  # it said it serves
        self.generation = generation  # the supervisor's SIGHUPs before it started
        self.replaces = replaces  # in a reload: the process ID of the one it takes over from
        self.retiring = False  # told to drain: its replacement is ready

    def poll(self) -> Optional[int]:
        """None while it runs; once it has ended, its exit status (a signal that
        killed it as minus its number), and it is reaped."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid else None

    def ended(self, code: int) -> str:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
            f"exited with status {code}"
        return how if self.ready else how + " before it was ready"


class Supervisor:
    """--workers N: open the listening socket once, and start N server processes
    that share it (the kernel gives each new connection to one of them; one
    socket, not SO_REUSEPORT, so it works on macOS too), each pinned to a CPU of
    its own with --cpu auto. Each is a fork of this process, which has the code
    loaded already (become_worker()), told which worker it is and given the socket,
    the metrics table and a pipe as descriptors; it writes on the pipe when it
    serves. At most one a CPU starts at a time.

    Restart one that dies, with a backoff. On SIGTERM or Ctrl-C, tell each worker
    (DRAIN_SIGNAL), let each drain as a lone server does, and exit 0 when all have;
    a second signal kills them all at once. On SIGHUP, reload: one worker at a
    time, start a new process that loads the code as the file is now (a fork that
    execs the interpreter anew, as is every process started from then on), and
    once it is ready, tell the old one to drain; wait for it to stop, then the
    next (a deploy without downtime, as gunicorn's and nginx's). A new process
    that fails stops the reload, and the old one serves on.

    Its state is touched by run()'s thread alone: signals reach it through a pipe
    (see run()), not through handlers that change it, and each iteration of
    run()'s loop reads them, so it heeds them at any moment, starting included."""

    def __init__(self, args: argparse.Namespace, limits: Limits, argv: List[str]):
        self.args, self.limits, self.argv = args, limits, argv
        count = args.workers
        self.workers: Dict[int, WorkerProcess] = {}  # process ID -> started, not yet reaped
        self.due: Dict[int, float] = {}  # worker number -> time.monotonic() it is to start at
        self.deaths = [0] * count  # each worker's unplanned ends in a row, all but the first young
        self.last_end = [""] * count  # how each one's last process ended unplanned
        self.restarted = 0  # processes started in place of one that ended unplanned
        self.generation = 0  # SIGHUPs so far: a reload replaces each worker started before
        self.reloading: Optional[float] = None  # when the reload under way began
        self.stopping: List[str] = []  # the name of the signal that stops it, once one came
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = allowed if args.cpu == "auto" else []
        self.at_once = usable_cpus()  # workers starting at most at once
        self.pid = os.getpid()
        # How a process started after a SIGHUP runs this code anew: as this process does.
        # Run as a module (python3 -m scheduler), it is too, and so loads its bytecode
        # from the cache that the import system keeps beside the file, where a script is
        # compiled anew at every start. The cache is checked against the file's
        # modification time and size, so it still loads the code as the file is now.
        self.code = (["-m", __spec__.name] if __name__ == "__main__" and __spec__ is not None
                     else [os.path.abspath(__file__)])
        self.listener: Optional[socket.socket] = None
        # A slot for each worker process, and one more for a reload's new process while
        # the one it replaces drains; the last slot is the supervisor's own.
        self.metrics = MetricsTable(count + 2)
        self.free_slots = list(range(count + 1))
        self._wake = self._woken = -1  # the self-pipe's ends

    def run(self) -> int:
        """Open the store (once, here: workers opening a new file at once would race
        to create it) and the socket, start the workers, and look after them until
        they have all stopped. The exit status."""
        store = open_store(self.args, self.limits)
        if store is None:
            return 1
        store.close()
        for notice in store.notices:
            say(notice)
        try:
            self.listener = socket.create_server(
                (self.args.host, self.args.port), family=address_family(self.args.host),
                backlog=SchedulerServer.request_queue_size)
        except OSError as error:
            say(cannot_listen(self.args, error))
            return 1
        self.listener.setblocking(False)  # workers race to accept: those that lose must not wait
        # Signals are handled by the loop below, not by handlers: Python runs a handler
        # only between bytecodes, so a signal that came just before a blocking wait went
        # unheard until a worker died (a SIGTERM was lost about once in 20 starts).
        # Instead each signal writes its number to this pipe (set_wakeup_fd), and
        # select() sees it, whenever it came: the self-pipe trick, as gunicorn's arbiter.
        self._wake, self._woken = os.pipe()
        for fd in (self._wake, self._woken):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._woken)
        for signum in CONTROL_SIGNALS + (signal.SIGCHLD,):
            signal.signal(signum, lambda signum, frame: None)  # the number is in the pipe
        print(f"Listening on {url_of(self.listener.getsockname())} with {self.args.workers} "
              "workers (Ctrl-C to stop)", flush=True)
        self.due = dict.fromkeys(range(self.args.workers), time.monotonic())  # all due now
        while self.workers or self.due:
            self.wait()
            self.reap()
            self.start_due()
            self.reload_step()
            self.publish()
        say(f"{self.stopping[0]} received: every worker has drained and stopped."
            if self.stopping else "Every worker has stopped.")
        return 0

    def starting(self) -> List[WorkerProcess]:
        """The processes started that have not yet said they are ready (nor ended)."""
        return [worker for worker in self.workers.values() if worker.ready_fd is not None]

    def wait(self) -> None:
        """Wait for a signal, a readiness, a start due, or a readiness deadline; then
        act on the signals and readinesses, and kill the processes not ready in time."""
        starting = self.starting()
        times = [worker.started + READY_SECONDS for worker in starting]
        if len(starting) < self.at_once and self.free_slots:
            times += self.due.values()
        timeout = max(0.0, min(times) - time.monotonic()) if times else None
        readable = select.select([self._wake] + [w.ready_fd for w in starting], [], [],
                                 timeout)[0]
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self._wake, 256):
                if signum == signal.SIGHUP:
                    self.reload()
                elif signum in CONTROL_SIGNALS:
                    self.stop(signum)
        for worker in starting:
            if worker.ready_fd in readable:
                self.readiness(worker)
            elif worker.started + READY_SECONDS <= time.monotonic():
                say(f"Worker {worker.number} (process {worker.pid}) was not ready within "
                    f"{READY_SECONDS:g} s of its start: killing it.")
                self.forget_pipe(worker)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def forget_pipe(self, worker: WorkerProcess) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None

    def readiness(self, worker: WorkerProcess) -> None:
        """The process wrote on its pipe (it is ready), or closed it (it has ended).
        A reload's new process that is ready takes over: the old one drains."""
        with contextlib.suppress(OSError):
            worker.ready = bool(os.read(worker.ready_fd, 16))
        self.forget_pipe(worker)
        old = self.workers.get(worker.replaces) if worker.ready else None
        if old is not None:
            worker.replaces = None
            if not self.stopping:  # else it has been told already
                old.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old.pid, DRAIN_SIGNAL)
                say(f"Worker {worker.number} (process {worker.pid}) is ready: process "
                    f"{old.pid} drains and stops.")

    def start_due(self) -> None:
        """Start the worker due first, if its time has come and fewer than at_once
        are starting: one at a time, so that signals are read between two starts."""
        if not self.due or len(self.starting()) >= self.at_once or not self.free_slots:
            return
        number = min(self.due, key=lambda number: (self.due[number], number))
        if self.due[number] <= time.monotonic():
            del self.due[number]
            if self.deaths[number]:  # not its first start
                self.restarted += 1
            self.start(number)

    def start(self, number: int, replaces: Optional[int] = None) -> None:
        """Start a process for worker number (in a reload, to take over from process
        replaces), with the arguments this one was given (become_worker())."""
        slot = self.free_slots.pop(0)
        ready, told = os.pipe()
        listener, table = self.listener.fileno(), self.metrics.fd
        setting = json.dumps({
            "number": number, "slot": slot, "slots": self.metrics.slots, "listener": listener,
            "metrics": table, "ready": told, "supervisor": self.pid,
            "cpu": self.cpus[number % len(self.cpus)] if self.cpus else None})
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)  # none until it is ready for them
        flush_output()  # else the child would write what is buffered out again
        try:
            pid, why = os.fork(), ""
        except OSError as error:
            pid, why = -1, error.strerror
        if pid == 0:
            self.become_worker(setting, (listener, table, told), ready)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        os.close(told)
        if pid < 0:
            self.free_slots.append(slot)
            os.close(ready)
            self.failed_to_start(number, replaces, f"could not be started ({why})")
            return
        self.workers[pid] = WorkerProcess(number, slot, pid, ready, self.generation, replaces)
        say(f"Worker {number} started (process {pid})"
            + (f" to replace process {replaces}." if replaces else "."))

    def become_worker(self, setting: str, passed: Tuple[int, ...], ready: int) -> None:
        """In the child that start() forked: be the worker that setting (JSON, as
        WORKER_VARIABLE carries it) describes, given the descriptors passed, then
        exit; never return to the supervisor's loop. Until a SIGHUP, it runs the
        code this process loaded, and so starts without loading it again; this
        process has no other thread, so the child may go on (as socketserver's
        ForkingMixIn does). After one, it loads the code anew, as the file is now:
        it execs the interpreter as this process was run (the same options, -S or
        -X, as multiprocessing passes them on), with setting in WORKER_VARIABLE."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)  # the supervisor's self-pipe and handlers are its own
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in [ready, self._wake, self._woken] + [
                    worker.ready_fd for worker in self.workers.values()
                    if worker.ready_fd is not None]:
                os.close(fd)
            if self.generation:
                for fd in passed:
                    os.set_inheritable(fd, True)
                os.execve(sys.executable, [
                    sys.executable, *subprocess._args_from_interpreter_flags(), *self.code,
                    *self.argv], {**os.environ, WORKER_VARIABLE: setting})
            status = run_worker(self.args, self.limits, setting)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # as an uncaught exception would end it
        finally:
            flush_output()
            os._exit(status)

    def stop(self, signum: int) -> None:
        """The first signal: tell the workers to drain and stop (DRAIN_SIGNAL), and
        let them. The second: kill them all, and exit now."""
        if self.stopping:
            for pid in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os._exit(1)
        self.stopping.append(signal.Signals(signum).name)
        self.due.clear()
        self.reloading = None
        self.listener.close()  # new connections are refused once every worker closed it too
        for pid in self.workers:  # a retiring one has been told: telling it again does nothing
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, DRAIN_SIGNAL)

    def reload(self) -> None:
        """SIGHUP: replace every worker started before it (reload_step() does, one at
        a time); a worker waiting to be started again starts now, on the new code."""
        if self.stopping:
            return
        self.generation += 1
        self.reloading = time.monotonic()
        self.due = dict.fromkeys(self.due, self.reloading)
        say(f"SIGHUP received: replacing the {self.args.workers} workers one at a time with "
            "processes that load the code anew.")

    def reload_step(self) -> None:
        """In a reload, when no new process is starting and no old one draining:
        start the next worker's new process, or say the reload is done."""
        if self.reloading is None or self.stopping or any(
                worker.replaces is not None or worker.retiring
                for worker in self.workers.values()):
            return
        old = [worker for worker in self.workers.values() if worker.generation < self.generation]
        if not old:
            say(f"Reload done in {time.monotonic() - self.reloading:.1f} s: every worker runs "
                "the code as it was at the SIGHUP, or since.")
            self.reloading = None
            return
        serving = sorted((worker.number, worker.pid) for worker in old if worker.ready)
        if serving and self.free_slots:  # else one is starting still: wait for it
            self.start(*serving[0])

    def reap(self) -> None:
        """Collect the worker processes that ended, and plan what follows each end."""
        for pid, worker in list(self.workers.items()):
            code = worker.poll()
            if code is None:
                continue
            del self.workers[pid]
            self.forget_pipe(worker)
            self.metrics.retire(worker.slot)
            self.free_slots.append(worker.slot)
            if self.stopping:
                continue
            if worker.retiring:
                say(f"Worker {worker.number}'s process {pid}, replaced, {worker.ended(code)}.")
                continue
            successor = next((other for other in self.workers.values()
                              if other.replaces == pid), None)
            if successor is not None:  # the new process started to replace it takes over
                successor.replaces = None
                say(f"Worker {worker.number} (process {pid}) {worker.ended(code)}; process "
                    f"{successor.pid}, started to replace it, takes its place.")
                continue
            young = time.monotonic() - worker.started < WORKER_YOUNG
            self.failed_to_start(worker.number, worker.replaces, worker.ended(code),
                                 f"Worker {worker.number} (process {pid})", young)

    def failed_to_start(self, number: int, replaces: Optional[int], how: str,
                        who: str = "", young: bool = True) -> None:
        """A process of worker number ended unplanned (or could not be started): a
        reload's new one stops the reload; another is started again after a wait."""
        who = who or f"Worker {number}"
        if replaces is not None:
            self.reloading = None
            # Where none runs the new code, the count goes back to what the workers run:
            # one started again later starts as they did. Before any reload that
            # succeeded, that is a fork of the code loaded, not the file that failed;
            # after one, it is the file as it is then (an exec reads it anew).
            self.generation = max((worker.generation for worker in self.workers.values()),
                                  default=self.generation)
            say(f"{who}, started to replace process {replaces}, {how}: the reload stops, and "
                "the workers serve on with the code they had loaded.")
            return
        self.deaths[number] = self.deaths[number] + 1 if young else 1
        delay = min(WORKER_BACKOFF * 2 ** min(self.deaths[number] - 1, 16), WORKER_BACKOFF_MOST)
        self.last_end[number] = how
        say(f"{who} {how}; starting another in {delay:g} s.")
        self.due[number] = time.monotonic() + delay

    def publish(self) -> None:
        """Write the supervisor's samples, and which workers are failing, to its slot."""
        ready = {worker.number for worker in self.workers.values()
                 if worker.ready and not worker.retiring}
        failing = [number for number, deaths in enumerate(self.deaths)
                   if deaths >= CRASH_LOOP and number not in ready]
        samples = {
            "scheduler_workers_running": [
                "gauge", "Worker processes serving (during a reload, one more for a moment).",
                sum(worker.ready and not worker.retiring for worker in self.workers.values())],
            "scheduler_workers_restarting": [
                "gauge", "Workers that ended unplanned and wait to be started again.",
                sum(self.deaths[number] > 0 for number in self.due)],
            "scheduler_workers_failing": [
                "gauge", f"Workers that died young {CRASH_LOOP} times in a row or more, and "
                         "do not serve (/healthz names them).", len(failing)],
            "scheduler_worker_restarts_total": [
                "counter", "Worker processes started in place of one that ended unplanned.",
                self.restarted]}
        self.metrics.put(self.metrics.slots - 1, SeriesLayout(()), [], samples, [
            {"worker": number, "deaths": self.deaths[number], "last": self.last_end[number]}
            for number in failing])


if __name__ == "__main__":
    sys.exit(main())
