"""A webhook receiver for Lathe's job events, made with nothing but the standard library and the
official `openai` SDK: it registers itself as an endpoint (`client.webhooks.create`), verifies every
delivery with `client.webhooks.unwrap` and prints the job it names.

    lathe serve   # with LATHE_WEBHOOK_ALLOW_PRIVATE=true: this receiver listens on 127.0.0.1
    python examples/webhook_receiver.py --base-url http://127.0.0.1:8000/v1 --api-key $(cat .lathe/dev-key)

--fail-first N answers 500 to the first N deliveries, to watch the retries (same webhook-id).
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, HTTPServer

import openai
from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--exit-after", type=int, default=0, help="stop after this many verified events")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    endpoint = client.webhooks.create(
        name="example receiver", url=f"http://127.0.0.1:{args.port}/hooks",
        event_types=["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"])
    print(f"endpoint {endpoint.id} -> {endpoint.url}", flush=True)
    seen = {"requests": 0, "verified": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            seen["requests"] += 1
            try:
                event = client.webhooks.unwrap(body, dict(self.headers), secret=endpoint.signing_secret)
            except openai.InvalidWebhookSignatureError as exc:
                print(f"REJECTED {self.headers.get('webhook-id')}: {exc}", flush=True)
                self.send_response(400)
                self.end_headers()
                return
            failing = seen["requests"] <= args.fail_first
            job = client.fine_tuning.jobs.retrieve(event.data.id)
            print(f"{self.headers['webhook-id']} {event.type} {event.data.id}: status {job.status}, "
                  f"model {job.fine_tuned_model}, answering {500 if failing else 200}", flush=True)
            self.send_response(500 if failing else 200)
            self.end_headers()
            if not failing:
                seen["verified"] += 1

        def log_message(self, *_):
            pass

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    try:
        while not args.exit_after or seen["verified"] < args.exit_after:
            server.handle_request()
    finally:
        client.webhooks.delete(endpoint.id)
        server.server_close()


if __name__ == "__main__":
    main()
