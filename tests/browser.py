"""A headless Chromium driven over the DevTools protocol, to check pages as a browser shows them.

Chromium starts with a fresh profile, no sandbox (tests run as root in CI), no GPU, no background
networking, and `--remote-debugging-port=0`: it picks a free port on 127.0.0.1 and prints
"DevTools listening on ws://..." on stderr, which is read line by line (no polling). The test talks
to the page's target over a WebSocket (the `websocket-client` package): it enables the Runtime,
Log and Page domains first, navigates, reads events until the load event, then evaluates
expressions in the page. Console errors are every `Runtime.consoleAPICalled` of type error or
assert, every `Runtime.exceptionThrown` (an uncaught exception) and every `Log.entryAdded` of
level error (a resource that failed to load, a blocked request, ...).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from typing import Any

from imagebert_jax import allocator

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
  for name in CANDIDATES:
    path = shutil.which(name)
    if path:
      return path
  return None


class PageError(RuntimeError):
  pass


class Browser:
  """`with Browser() as b: page = b.load("file:///...")`."""

  def __init__(self, executable: str | None = None, timeout: float = 120.0):
    self.executable = executable or find_chromium()
    if not self.executable:
      raise FileNotFoundError("no chromium found on PATH")
    self.timeout = timeout
    self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
    self.process = None
    self.stderr_tail: list[str] = []

  def __enter__(self) -> "Browser":
    self.process = subprocess.Popen(
        [self.executable, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--no-default-browser-check", f"--user-data-dir={self.profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=allocator.without_preload())  # chromium brings its own allocator
    address = None
    for line in self.process.stderr:
      self.stderr_tail = (self.stderr_tail + [line])[-20:]
      found = re.search(r"DevTools listening on (ws://\S+)", line)
      if found:
        address = found.group(1)
        break
    if address is None:
      self.close()
      raise PageError("chromium exited before its DevTools endpoint was up:\n"
                      + "".join(self.stderr_tail))
    # Keep reading stderr so that chromium never blocks on a full pipe.
    threading.Thread(target=self._drain, daemon=True).start()
    self.http = "http://" + re.match(r"ws://([^/]+)/", address).group(1)
    return self

  def _drain(self) -> None:
    for _ in self.process.stderr:
      pass

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    shutil.rmtree(self.profile, ignore_errors=True)

  def _page_socket(self):
    import websocket
    with urllib.request.urlopen(self.http + "/json/list", timeout=self.timeout) as r:
      targets = json.load(r)
    pages = [t for t in targets if t.get("type") == "page"]
    if not pages:
      raise PageError("chromium has no page target")
    return websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=self.timeout,
                                       suppress_origin=True)

  def load(self, url: str) -> "Page":
    """Navigates the page to `url` and returns it once its load event has fired."""
    page = Page(self._page_socket())
    for domain in ("Runtime", "Log", "Page"):
      page.call(f"{domain}.enable")
    result = page.call("Page.navigate", url=url)
    if result.get("errorText"):
      raise PageError(f"{url}: {result['errorText']}")
    page.wait_for("Page.loadEventFired")
    page.call("Runtime.evaluate", expression="0")  # events queued before this are now read
    return page


class Page:
  def __init__(self, socket):
    self.socket = socket
    self.events: list[dict] = []
    self._next = 0

  def _read(self) -> dict:
    message = json.loads(self.socket.recv())
    if "method" in message:
      self.events.append(message)
    return message

  def call(self, method: str, **params) -> dict:
    self._next += 1
    ident = self._next
    self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
    while True:
      message = self._read()
      if message.get("id") == ident:
        if "error" in message:
          raise PageError(f"{method}: {message['error']}")
        return message.get("result", {})

  def wait_for(self, event: str) -> dict:
    while True:
      message = self._read()
      if message.get("method") == event:
        return message

  def evaluate(self, expression: str) -> Any:
    """The value of a JavaScript expression (JSON-serialisable), evaluated in the page."""
    result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
      raise PageError(f"{expression[:80]}: {result['exceptionDetails']}")
    return result["result"].get("value")

  def console_errors(self) -> list[str]:
    """Console errors, uncaught exceptions and error log entries, as text."""
    out = []
    for e in self.events:
      p = e["params"]
      if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
        out.append("console." + p["type"] + ": " + " ".join(
            str(a.get("value", a.get("description", ""))) for a in p["args"]))
      elif e["method"] == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
      elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
        out.append(f"log: {p['entry']['text']} ({p['entry'].get('url', '')})")
    return out

  def close(self) -> None:
    self.socket.close()
