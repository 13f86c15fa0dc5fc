"""Appointment scheduler: book 30-minute sessions with practitioners over HTTP/JSON.

Run it with ``python3 scheduler.py`` (``--help`` lists the options) and talk to it
with curl; the README documents every endpoint. Standard library only, Python 3.9+.

    POST /appointments             {"user_id": "alice", "date": "2026-11-25", "time": "09:30"}
    GET  /appointments?user_id=alice

Appointments last 30 minutes and start on the hour or half hour, UTC. Any number
of users may book the same slot; each user may hold one appointment per date.

The file reads top to bottom: constants, errors, the domain (what an appointment
is and how one is validated), the store, the routes, the HTTP handler, the server
factory and ``main()``. Each layer only uses the ones above it.
"""

import argparse
import datetime as dt
import json
import os
import re
import signal
import socket
import sys
import threading
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, TextIO, Tuple

__version__ = "1.0"

# --- Constants ----------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

APPOINTMENT_LENGTH = dt.timedelta(minutes=30)
MAX_USER_ID_LENGTH = 256
MAX_BODY_BYTES = 64 * 1024

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"

# Anchored with fullmatch(); [0-9] rather than \d, which also matches non-ASCII digits.
_DATE_FORMAT = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_TIME_FORMAT = re.compile(r"([0-9]{2}):([0-9]{2})")
# Control characters (Unicode category Cc) and lone surrogates (Cs), which JSON
# can carry as \u escapes but which cannot be encoded as UTF-8 later.
_FORBIDDEN_IN_USER_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


# --- Errors -------------------------------------------------------------------
# Raised anywhere, turned into an RFC 9457 problem response in exactly one place
# (SchedulerHandler.dispatch). Anything else that escapes a route becomes a 500.


class ServiceError(Exception):
    """A failure the client can act on: an HTTP status, a title and a detail."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    title = "Internal Server Error"

    def __init__(self, detail: str, *, headers: Optional[Dict[str, str]] = None, **extensions):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    def problem(self) -> dict:
        """The RFC 9457 problem details object for this error."""
        return {
            # about:blank: the status says what went wrong, so title is its phrase.
            "type": "about:blank",
            "title": self.title,
            "status": int(self.status),
            "detail": self.detail,
            **self.extensions,
        }


class BadRequest(ServiceError):
    """The request itself cannot be parsed: bad JSON, bad query, bad headers."""

    status = HTTPStatus.BAD_REQUEST
    title = "Bad Request"


class NotFound(ServiceError):
    status = HTTPStatus.NOT_FOUND
    title = "Not Found"


class MethodNotAllowed(ServiceError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    title = "Method Not Allowed"

    def __init__(self, method: str, allowed: List[str]):
        allow = ", ".join(allowed)
        super().__init__(f"{method} is not supported here; use {allow}.", headers={"Allow": allow})


class Conflict(ServiceError):
    status = HTTPStatus.CONFLICT
    title = "Conflict"


class LengthRequired(ServiceError):
    status = HTTPStatus.LENGTH_REQUIRED
    title = "Length Required"


class ContentTooLarge(ServiceError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    title = "Content Too Large"  # RFC 9110's name; older Pythons say "Request Entity Too Large"


class UnsupportedMediaType(ServiceError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    title = "Unsupported Media Type"


class ValidationError(ServiceError):
    """A well-formed request whose fields are missing or invalid; lists every one."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    title = "Unprocessable Content"  # RFC 9110's name; older Pythons say "Unprocessable Entity"

    def __init__(self, errors: List[Dict[str, str]]):
        fields = ", ".join(error["field"] for error in errors)
        noun = "field is" if len(errors) == 1 else "fields are"
        super().__init__(f"The appointment was not booked: {len(errors)} {noun} invalid ({fields}).",
                         errors=errors)


# --- Domain: what an appointment is -------------------------------------------


class Appointment(NamedTuple):
    """A booked 30-minute slot. Immutable, so it can be handed out freely."""

    user_id: str
    start: dt.datetime  # timezone-aware UTC, on the hour or half hour

    @property
    def date(self) -> dt.date:
        return self.start.date()

    @property
    def end(self) -> dt.datetime:
        return self.start + APPOINTMENT_LENGTH

    def as_json(self) -> dict:
        """The appointment as the API shows it: the fields it was booked with,
        plus its start and end as RFC 3339 UTC instants."""
        return {
            "user_id": self.user_id,
            "date": self.start.strftime("%Y-%m-%d"),
            "time": self.start.strftime("%H:%M"),
            "start": _rfc3339(self.start),
            "end": _rfc3339(self.end),
        }


def _rfc3339(instant: dt.datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_user_id(value) -> str:
    """Return the user ID as a string; raise ValueError saying what is wrong.

    A JSON integer is accepted as its decimal string, so 42 and "42" are one user.
    """
    if isinstance(value, int) and not isinstance(value, bool):  # bool is an int
        if abs(value) >= 10 ** MAX_USER_ID_LENGTH:  # checked before str(): that is slow on huge ints
            raise ValueError(f"user_id must be at most {MAX_USER_ID_LENGTH} characters long")
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("user_id must be a string or an integer")
    if not value:
        raise ValueError("user_id must not be empty")
    if len(value) > MAX_USER_ID_LENGTH:
        raise ValueError(f"user_id must be at most {MAX_USER_ID_LENGTH} characters long")
    if _FORBIDDEN_IN_USER_ID.search(value):
        raise ValueError("user_id must not contain control characters or lone surrogates")
    if value != value.strip():
        raise ValueError("user_id must not start or end with whitespace")
    return value


def parse_date(value) -> dt.date:
    """Return the calendar date for a YYYY-MM-DD string; raise ValueError otherwise."""
    match = _DATE_FORMAT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("date must be a string in YYYY-MM-DD format, e.g. 2026-11-25")
    try:
        return dt.date(*map(int, match.groups()))
    except ValueError:
        raise ValueError(f"date {value} is not a real calendar date") from None


def parse_time(value) -> dt.time:
    """Return the start time for an HH:MM string on the hour or half hour; raise
    ValueError otherwise."""
    match = _TIME_FORMAT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("time must be a string in 24-hour HH:MM format, e.g. 09:30; "
                         "appointments start on the hour or half hour")
    hour, minute = map(int, match.groups())
    if hour > 23:
        raise ValueError(f"time {value} is not a time of day: hours run from 00 to 23")
    if minute not in (0, 30):
        raise ValueError(f"time {value} is not bookable: appointments start on the hour "
                         "or half hour (minutes 00 or 30)")
    return dt.time(hour, minute)


_FIELD_PARSERS = (("user_id", parse_user_id), ("date", parse_date), ("time", parse_time))


def parse_appointment(fields: Mapping) -> Appointment:
    """Build an Appointment from a request's fields (unknown ones are ignored).

    Raises ValidationError naming every missing or invalid field at once.
    """
    values, errors = {}, []
    for name, parse in _FIELD_PARSERS:
        if name not in fields:
            errors.append({"field": name, "message": f"{name} is required"})
            continue
        try:
            values[name] = parse(fields[name])
        except ValueError as error:
            errors.append({"field": name, "message": str(error)})
    if errors:
        raise ValidationError(errors)
    start = dt.datetime.combine(values["date"], values["time"], tzinfo=dt.timezone.utc)
    return Appointment(values["user_id"], start)


# --- Store ----------------------------------------------------------------------


class InMemoryStore:
    """Appointments in a dict, shared safely by the request threads.

    Holds user ID -> {date -> start}. Dates and datetimes are immutable and
    untracked by the garbage collector, so a large store stays cheap to keep.
    """

    def __init__(self):
        self._lock = threading.Lock()  # guards _by_user
        self._by_user: Dict[str, Dict[dt.date, dt.datetime]] = {}

    def book(self, appointment: Appointment) -> Appointment:
        """Store the appointment and return it.

        Raises Conflict, carrying the existing appointment, when the user already
        has one that date. The check and the insert happen under one lock hold.
        """
        date = appointment.date
        with self._lock:
            days = self._by_user.setdefault(appointment.user_id, {})
            existing = days.get(date)
            if existing is None:
                days[date] = appointment.start
        if existing is not None:
            booked = Appointment(appointment.user_id, existing)
            raise Conflict(
                f"User {appointment.user_id} already has an appointment on {date.isoformat()}, "
                f"at {existing:%H:%M}; a user may book one appointment per date.",
                appointment=booked.as_json())
        return appointment

    def list_for_user(self, user_id: str) -> List[Appointment]:
        """The user's appointments sorted by start; empty for an unknown user."""
        with self._lock:
            starts = list(self._by_user.get(user_id, {}).values())
        return [Appointment(user_id, start) for start in sorted(starts)]


# --- Routes ---------------------------------------------------------------------
# Each route is a function from parsed input to a Reply. It never sees a socket.


class Request(NamedTuple):
    """What a route gets: decoded path parameters, the query and the JSON body."""

    params: Dict[str, str]
    query: Dict[str, List[str]]
    body: object = None  # parsed JSON; only for routes that declare reads_body


class Reply(NamedTuple):
    status: HTTPStatus
    body: object  # anything json.dumps takes
    headers: Tuple[Tuple[str, str], ...] = ()


def appointment_url(appointment: Appointment) -> str:
    """The appointment's own URL, with the user ID percent-encoded so that any ID
    (with /, ?, spaces or CR/LF) stays one path segment and one header line."""
    user = urllib.parse.quote(appointment.user_id, safe="")
    return f"/appointments/{user}/{appointment.date.isoformat()}"


def query_user_id(query: Dict[str, List[str]]) -> str:
    """The user_id query parameter; BadRequest when missing, repeated or invalid."""
    values = query.get("user_id", [])
    if not values or values == [""]:
        raise BadRequest("The user_id query parameter is required, "
                         "e.g. /appointments?user_id=alice.")
    if len(values) > 1:
        raise BadRequest("Give the user_id query parameter once.")
    try:
        return parse_user_id(values[0])
    except ValueError as error:
        raise BadRequest(f"Invalid query parameter: {error}.") from None


def list_appointments(store: InMemoryStore, request: Request) -> Reply:
    user_id = query_user_id(request.query)
    appointments = store.list_for_user(user_id)
    return Reply(HTTPStatus.OK, {"user_id": user_id,
                                 "appointments": [a.as_json() for a in appointments]})


def book_appointment(store: InMemoryStore, request: Request) -> Reply:
    if not isinstance(request.body, dict):
        raise BadRequest("The request body must be a JSON object, e.g. "
                         '{"user_id": "alice", "date": "2026-11-25", "time": "09:30"}.')
    appointment = store.book(parse_appointment(request.body))
    return Reply(HTTPStatus.CREATED, appointment.as_json(),
                 (("Location", appointment_url(appointment)),))


class Route(NamedTuple):
    method: str
    path: str  # literal segments, or {name} to capture one decoded segment
    handler: Callable[[InMemoryStore, Request], Reply]
    reads_body: bool = False


ROUTES = (
    Route("GET", "/appointments", list_appointments),
    Route("POST", "/appointments", book_appointment, reads_body=True),
)


def _match_segments(pattern: List[str], segments: List[str]) -> Optional[Dict[str, str]]:
    if len(pattern) != len(segments):
        return None
    params = {}
    for want, have in zip(pattern, segments):
        if want.startswith("{") and want.endswith("}"):
            params[want[1:-1]] = have
        elif want != have:
            return None
    return params


def match(routes, method: str, path: str) -> Tuple[Route, Dict[str, str]]:
    """Find the route for a request; return it with its decoded path parameters.

    Raises NotFound for an unknown path and MethodNotAllowed (with the allowed
    methods) for a known path and another method. HEAD is served as GET.
    """
    try:  # split the raw path first, so an encoded "/" stays inside its segment
        segments = [urllib.parse.unquote(s, errors="strict") for s in path.split("/")]
    except UnicodeDecodeError:
        raise BadRequest("The path is not valid percent-encoded UTF-8.") from None
    allowed = []
    for route in routes:
        params = _match_segments(route.path.split("/"), segments)
        if params is None:
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route, params
        allowed += [route.method, "HEAD"] if route.method == "GET" else [route.method]
    if allowed:
        raise MethodNotAllowed(method, allowed)
    raise NotFound(f"There is no resource at {path}; see the README for the API.")


# --- HTTP handler -----------------------------------------------------------------


def parse_query(query: str) -> Dict[str, List[str]]:
    """Decode a query string; BadRequest when it is not percent-encoded UTF-8."""
    try:
        return urllib.parse.parse_qs(query, keep_blank_values=True, errors="strict",
                                     max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The query string is not valid: it must be percent-encoded UTF-8 "
                         "with at most 100 parameters.") from None


def _object_without_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"The JSON body has the key {key!r} more than once.")
        obj[key] = value
    return obj


def _reject_constant(name):
    raise BadRequest(f"The JSON body contains {name}, which is not valid JSON.")


def decode_json(raw: bytes) -> object:
    """Parse a request body as strict JSON; BadRequest says what is wrong with it.

    Beyond what json accepts, rejects NaN/Infinity, duplicate keys and non-UTF-8
    bytes, which different parsers read differently.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.") from None
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicate_keys,
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise BadRequest(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None


class SchedulerHandler(BaseHTTPRequestHandler):
    """Turns each HTTP request into a route call and its Reply into a response.

    Speaks HTTP/1.1 with keep-alive: every response has a Content-Length and is
    written in one send. All errors, including http.server's own, are problem+json.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"scheduler/{__version__}"

    def dispatch(self) -> None:
        self._body_consumed = False
        try:
            reply = self.route_request()
        except ServiceError as error:
            reply = self.problem_reply(error)
        except Exception:
            self.log_error("unhandled error in %r:\n%s", self.requestline, traceback.format_exc())
            reply = self.problem_reply(ServiceError(
                "The server hit an unexpected error and logged it; please try again."))
        if not self._body_consumed and self._declares_body():
            self.close_connection = True  # the unread body would be taken for the next request
        self.send_reply(reply)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = dispatch

    def route_request(self) -> Reply:
        path, _, query = self.path.partition("?")
        route, params = match(ROUTES, self.command, path)
        body = self.read_json_body() if route.reads_body else None
        return route.handler(self.server.store, Request(params, parse_query(query), body))

    def _declares_body(self) -> bool:
        return "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0"

    def read_json_body(self) -> object:
        """Read and parse the JSON body, enforcing Content-Type and a size cap."""
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != JSON_TYPE:
            raise UnsupportedMediaType(
                f"Send the body as JSON with the header 'Content-Type: {JSON_TYPE}' "
                f"(curl: -H 'Content-Type: {JSON_TYPE}'); got "
                f"{media_type or 'no Content-Type'}.")
        if "Transfer-Encoding" in self.headers:
            raise LengthRequired("Chunked request bodies are not supported; "
                                 "send the body with a Content-Length header.")
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise LengthRequired("A request body needs a Content-Length header.")
        if not declared.isdigit() or not declared.isascii():
            raise BadRequest(f"Content-Length must be a non-negative integer, not {declared!r}.")
        length = int(declared)
        if length > MAX_BODY_BYTES:
            raise ContentTooLarge(f"The body is {length} bytes; the limit is {MAX_BODY_BYTES}.")
        raw = self.rfile.read(length)
        self._body_consumed = True
        if len(raw) < length:
            self.close_connection = True
            raise BadRequest(f"The body ended after {len(raw)} of {length} bytes.")
        return decode_json(raw)

    def problem_reply(self, error: ServiceError) -> Reply:
        return Reply(error.status, error.problem(), tuple(error.headers.items()))

    def send_reply(self, reply: Reply) -> None:
        """Write status line, headers and body in one send: separate small writes
        meet Nagle's algorithm and delayed ACKs and stall keep-alive clients."""
        status = HTTPStatus(reply.status)
        body = (json.dumps(reply.body, ensure_ascii=False) + "\n").encode("utf-8")
        content_type = PROBLEM_TYPE if status >= 400 else JSON_TYPE
        lines = [
            f"{self.protocol_version} {status.value} {status.phrase}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.log_request(status.value, len(body))  # before the write, so it is never lost
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None):
        """http.server's own errors (bad request line, oversized headers, unknown
        method...) as problem+json too. The connection is closed after them."""
        self.close_connection = True
        error = ServiceError(message or HTTPStatus(code).description)
        error.status = HTTPStatus(code)
        error.title = error.status.phrase
        self.send_reply(self.problem_reply(error))

    def log_message(self, format: str, *args) -> None:
        stream = self.server.log_stream
        if stream is not None:
            stream.write(f"{self.address_string()} - - [{self.log_date_time_string()}] "
                         f"{format % args}\n")


# --- Server ---------------------------------------------------------------------


class SchedulerServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the shared store and log stream."""

    daemon_threads = True  # an open keep-alive connection must not block exit
    request_queue_size = 128  # listen backlog; the default 5 drops bursts of connects

    def __init__(self, address, store, log_stream):
        self.store = store
        self.log_stream = log_stream
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, SchedulerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, store=None, *,
                log_stream: Optional[TextIO] = sys.stderr) -> SchedulerServer:
    """Build a bound server (port 0 picks a free port); the caller runs serve_forever().

    store defaults to a new InMemoryStore. log_stream gets one access-log line a
    request and the tracebacks of unexpected errors; None silences it.
    Raises OSError when the address cannot be bound.
    """
    return SchedulerServer((host, port), store if store is not None else InMemoryStore(),
                           log_stream)


# --- Command line ----------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return port


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Appointment scheduler: an HTTP JSON API for booking 30-minute "
                    "appointments (UTC). Logs one line per request to stderr; "
                    "Ctrl-C or SIGTERM stops it.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=_port, default=None,
                        help=f"port to listen on; 0 picks a free one (default: $PORT, "
                             f"else {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    if args.port is None:
        try:
            args.port = _port(os.environ.get("PORT", str(DEFAULT_PORT)))
        except argparse.ArgumentTypeError as error:
            parser.error(f"PORT environment variable: {error}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        server = make_server(args.host, args.port)
    except OSError as error:
        print(f"scheduler: cannot listen on {args.host}:{args.port}: {error.strerror}",
              file=sys.stderr)
        return 1
    # SIGTERM stops the server like Ctrl-C does: serve_forever returns, then we close.
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"Listening on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
