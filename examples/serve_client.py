"""Talk to `edgeqwen serve` from another program, standard library only (nothing to install on the client).

    edgeqwen serve BUNDLE --port 8000 &          # on the board
    python serve_client.py "Reverse a list in Python" [--url http://127.0.0.1:8000] [--key KEY]

Streams the answer (server-sent events, one JSON chunk per `data:` line, `[DONE]` at the end), then prints the
token usage the server reports, including how many prompt tokens the KV cache already held. The official
`openai` client works the same way: OpenAI(base_url=URL + "/v1", api_key=KEY).
"""
import argparse
import json
import urllib.error
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("prompt")
ap.add_argument("--url", default="http://127.0.0.1:8000")
ap.add_argument("--key", default=None, help="the server's --api-key, if it has one")
ap.add_argument("--max-tokens", type=int, default=256)
args = ap.parse_args()

headers = {"Content-Type": "application/json"}
if args.key:
    headers["Authorization"] = f"Bearer {args.key}"
try:
    models = urllib.request.urlopen(urllib.request.Request(args.url + "/v1/models", headers=headers)).read()
    body = {"model": json.loads(models)["data"][0]["id"], "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(args.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
    with urllib.request.urlopen(request) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise SystemExit(f"\nserver error: {chunk['error']['message']}")
            for choice in chunk["choices"]:
                print(choice["delta"].get("content") or "", end="", flush=True)
            if chunk.get("usage"):
                u = chunk["usage"]
                print(f"\n[{u['prompt_tokens']} prompt tokens ({u['prompt_tokens_details']['cached_tokens']} "
                      f"cached), {u['completion_tokens']} generated]")
except urllib.error.HTTPError as e:  # 4xx/5xx come with an OpenAI-style JSON body naming the problem
    raise SystemExit(f"{e.code}: {json.loads(e.read())['error']['message']}") from None
except urllib.error.URLError as e:
    raise SystemExit(f"cannot reach {args.url}: {e.reason} (is `edgeqwen serve` running?)") from None
