"""A local Google Cloud Storage for the tests: gcp-storage-emulator behind a small HTTP front.

Run as a program (`python tests/gcs_emulator.py --bucket NAME --dir DIR`) it starts both in one
process and prints one JSON line with their addresses; `start()` does that from a test and
returns the environment that points every GCS client of this project at it.

Why a front at all. The clients this project uses reach GCS in three ways:

- TensorFlow's GCS file system (tf.io.gfile, TFDS, tf.data's TFRecord reads; etils.epath uses it
  for gs:// when TensorFlow is installed) has its endpoints compiled in
  (https://www.googleapis.com/storage/v1/, https://storage.googleapis.com/) and no setting to
  change them; its libcurl does honour `https_proxy`, `http_proxy` and `CURL_CA_BUNDLE`. The
  front is that proxy: it answers CONNECT with TLS under a certificate for those two host names,
  signed by a certificate authority made for the test (openssl), and passes the requests on to
  the emulator.
- TensorStore (Orbax's array files) takes an endpoint: TENSORSTORE_GCS_HTTP_URL names the
  front directly.
- gcsfs (etils.epath's gs:// without TensorFlow) honours STORAGE_EMULATOR_HOST.

Every request goes through the front, which de-chunks bodies (the emulator reads a body by
Content-Length even when Transfer-Encoding is chunked, and libcurl sends both) and passes each
request on a connection of its own (the emulator speaks HTTP/1.0, one request per connection).
The emulator process also gets what GCS does that the emulator lacks and these clients need
(`_complete_the_emulator`: empty objects, generations on downloads, generation preconditions).

Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_TOKEN = "emulator-token"  # sent as the bearer token; the emulator checks none


# ------------------------------------------------------------------------------------------------
# Certificates.
# ------------------------------------------------------------------------------------------------
def make_certificates(folder: str) -> tuple[str, str, str]:
  """(CA certificate, server certificate, server key) in `folder`, made with openssl."""
  openssl = shutil.which("openssl")
  if openssl is None:
    raise RuntimeError("the GCS emulator's TLS front needs the openssl command")
  p = lambda name: os.path.join(folder, name)

  def run(*args):
    subprocess.run([openssl, *args], check=True, capture_output=True)

  key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
  run("req", "-x509", *key, "-days", "2", "-subj", "/CN=emulator CA",
      "-keyout", p("ca.key"), "-out", p("ca.pem"),
      "-addext", "basicConstraints=critical,CA:TRUE",
      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
  with open(p("server.ext"), "w") as f:
    f.write("subjectAltName=" + ",".join(f"DNS:{h}" for h in HOSTS) + "\n"
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
  run("req", *key, "-subj", f"/CN={HOSTS[0]}", "-keyout", p("server.key"), "-out",
      p("server.csr"))
  run("x509", "-req", "-in", p("server.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"),
      "-CAcreateserial", "-days", "2", "-out", p("server.pem"), "-extfile", p("server.ext"))
  return p("ca.pem"), p("server.pem"), p("server.key")


# ------------------------------------------------------------------------------------------------
# The HTTP front.
# ------------------------------------------------------------------------------------------------
class _Reader:
  """Buffered reads of lines and byte counts from a socket."""

  def __init__(self, sock):
    self.sock, self.buf = sock, b""

  def _fill(self) -> bool:
    data = self.sock.recv(1 << 16)
    self.buf += data
    return bool(data)

  def line(self) -> bytes | None:
    while b"\r\n" not in self.buf:
      if not self._fill():
        return None
    line, self.buf = self.buf.split(b"\r\n", 1)
    return line

  def exactly(self, n: int) -> bytes:
    while len(self.buf) < n:
      if not self._fill():
        raise ConnectionError("connection closed inside a body")
    out, self.buf = self.buf[:n], self.buf[n:]
    return out


def _read_request(reader: _Reader):
  """(method, target, version, headers [(name, value)], body) or None at the end."""
  line = reader.line()
  while line == b"":
    line = reader.line()
  if line is None:
    return None
  method, target, version = line.decode("latin-1").split(" ", 2)
  headers = []
  while True:
    h = reader.line()
    if h is None:
      return None
    if not h:
      break
    name, _, value = h.decode("latin-1").partition(":")
    headers.append((name.strip(), value.strip()))
  lower = {k.lower(): v for k, v in headers}
  if lower.get("expect", "").lower() == "100-continue":  # else libcurl waits a second for it
    reader.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
  if "chunked" in lower.get("transfer-encoding", "").lower():
    body = b""
    while True:
      size = int(reader.line().split(b";")[0].strip() or b"0", 16)
      if size == 0:
        while reader.line():  # trailers up to the empty line
          pass
        break
      body += reader.exactly(size)
      reader.line()
  else:
    body = reader.exactly(int(lower.get("content-length", "0") or 0))
  return method, target, version, headers, body


class Front:
  """The proxy / endpoint in front of the emulator (see the module's docstring)."""

  def __init__(self, emulator_port: int, cert: str, key: str):
    self.emulator_port = emulator_port
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(cert, key)
    self.tls.set_alpn_protocols(["http/1.1"])
    self.server = socket.create_server(("127.0.0.1", 0))
    self.port = self.server.getsockname()[1]
    self.requests = 0

  def serve_forever(self) -> None:
    while True:
      conn, _ = self.server.accept()
      threading.Thread(target=self._client, args=(conn,), daemon=True).start()

  def _client(self, conn) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
      reader = _Reader(conn)
      request = _read_request(reader)
      if request is None:
        return
      if request[0] == "CONNECT":
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        conn = self.tls.wrap_socket(conn, server_side=True)
        reader = _Reader(conn)
        request = _read_request(reader)
      while request is not None:
        keep = self._forward(conn, request)
        if not keep:
          break
        request = _read_request(reader)
    except (OSError, ValueError, ConnectionError):
      pass
    finally:
      try:
        conn.close()
      except OSError:
        pass

  def _forward(self, conn, request) -> bool:
    """Sends one request to the emulator and its answer back; True to read another one."""
    method, target, _, headers, body = request
    self.requests += 1
    if target.startswith("http://") or target.startswith("https://"):
      parts = urlsplit(target)
      target = parts.path + ("?" + parts.query if parts.query else "")
    drop = {"transfer-encoding", "content-length", "connection", "proxy-connection",
            "keep-alive", "expect"}
    lines = [f"{method} {target} HTTP/1.0"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
    if body or method in ("POST", "PUT", "PATCH"):
      lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    started = time.time()
    with socket.create_connection(("127.0.0.1", self.emulator_port)) as up:
      up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
      up.shutdown(socket.SHUT_WR)
      answer = b""
      while True:
        data = up.recv(1 << 16)
        if not data:
          break
        answer += data
    head, _, payload = answer.partition(b"\r\n\r\n")
    if os.environ.get("GCS_FRONT_LOG"):
      with open(os.environ["GCS_FRONT_LOG"], "a") as log:
        log.write(f"{started:.3f} {time.time() - started:.3f} {method} {target} -> "
                  f"{head.decode('latin-1').splitlines()[0]} {len(body)} {len(payload)}\n")
    status, *rest = head.decode("latin-1").split("\r\n")
    status = "HTTP/1.1 " + status.split(" ", 1)[1]
    kept = [h for h in rest if h.split(":", 1)[0].strip().lower()
            not in ("content-length", "connection", "transfer-encoding")]
    no_body = method == "HEAD" or status.split(" ")[1] in ("204", "304")
    out = [status, *kept, f"Content-Length: {0 if no_body else len(payload)}"]
    conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
                 + (b"" if no_body else payload))
    return True


# ------------------------------------------------------------------------------------------------
# Starting both.
# ------------------------------------------------------------------------------------------------
def _complete_the_emulator(emulator_server) -> None:
  """What GCS does and gcp-storage-emulator (2026.7.19) does not, and this project's clients rely
  on: an empty media upload is an empty object (TensorFlow makes "folders" so), downloads carry
  the object's generation in `x-goog-generation` (TensorStore reads it), and the generation
  preconditions of reads and uploads hold (`ifGenerationMatch`: 412 when it differs;
  `ifGenerationNotMatch`: 304 Not Modified when it is the same; TensorStore's caches and
  Orbax's OCDBT manifests depend on them)."""
  from http import HTTPStatus

  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  read_data = emulator_server._read_data

  def read_data_empty_media(handler, query):
    data = read_data(handler, query)
    return b"" if data is None and query.get("uploadType") == ["media"] else data

  emulator_server._read_data = read_data_empty_media
  emulator_server.RequestHandler.disable_nagle_algorithm = True  # no 40 ms delayed-ACK waits

  def generation(storage, bucket, name) -> str:
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  def failed_precondition(request, response, current: str) -> bool:
    match = request.query.get("ifGenerationMatch", [None])[0]
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    if match is not None and match != current:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return True
    if not_match is not None and not_match == current and current != "0":
      response.status = HTTPStatus.NOT_MODIFIED
      return True
    return False

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    current = generation(storage, request.params["bucket_name"], request.params["object_id"])
    if current != "0":
      if failed_precondition(request, response, current):
        return None
      response["x-goog-generation"] = current
    return download(request, response, storage, *args, **kwargs)

  insert = objects.insert

  def insert_with_preconditions(request, response, storage, *args, **kwargs):
    name = request.query.get("name", [None])[0]
    if name is not None and failed_precondition(
        request, response, generation(storage, request.params["bucket_name"], name)):
      return None
    return insert(request, response, storage, *args, **kwargs)

  replaced = {download: download_with_generation, insert: insert_with_preconditions}
  objects.download = download_with_generation  # objects.get(alt=media) calls it by this name
  for _, methods in emulator_server.HANDLERS:
    for method, handler in list(methods.items()):
      methods[method] = replaced.get(handler, handler)


def _serve(bucket: str, folder: str) -> None:
  import logging
  logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
  from gcp_storage_emulator import server as emulator_server
  _complete_the_emulator(emulator_server)
  with socket.socket() as s:  # a free port for the emulator
    s.bind(("127.0.0.1", 0))
    emulator_port = s.getsockname()[1]
  server = emulator_server.create_server("127.0.0.1", emulator_port, in_memory=True,
                                         default_bucket=bucket)
  server.start()
  ca, cert, key = make_certificates(folder)
  front = Front(emulator_port, cert, key)
  print(json.dumps({"front": front.port, "emulator": emulator_port, "ca": ca}), flush=True)
  front.serve_forever()


class Emulator:
  """A running emulator process; `env` points GCS clients at it."""

  def __init__(self, bucket: str, folder: str):
    self.bucket = bucket
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--bucket", bucket, "--dir", folder],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the GCS emulator did not start (exit {self.process.wait()})")
    info = json.loads(line)
    front = f"127.0.0.1:{info['front']}"
    self.emulator = f"http://127.0.0.1:{info['emulator']}"
    self.env = {
        # TensorFlow's GCS file system: through the front, trusting the test's CA.
        "https_proxy": f"http://{front}", "HTTPS_PROXY": f"http://{front}",
        "http_proxy": f"http://{front}", "HTTP_PROXY": f"http://{front}",
        "no_proxy": "", "NO_PROXY": "",
        "CURL_CA_BUNDLE": info["ca"],
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": _TOKEN, "NO_GCE_CHECK": "true",
        # TensorStore (Orbax).
        "TENSORSTORE_GCS_HTTP_URL": f"http://{front}",
        # gcsfs and google-cloud-storage.
        "STORAGE_EMULATOR_HOST": f"http://{front}",
    }

  def objects(self, prefix: str = "") -> list[str]:
    """Names of the objects in the bucket (asked of the emulator itself, not through TF)."""
    import urllib.parse
    import urllib.request
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      url = f"{self.emulator}/storage/v1/b/{self.bucket}/o?{query}"
      opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
      with opener.open(url, timeout=30) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return names

  def close(self) -> None:
    self.process.kill()
    self.process.wait()


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--bucket", required=True)
  parser.add_argument("--dir", required=True)
  args = parser.parse_args()
  _serve(args.bucket, args.dir)
