"""Talk to `genfarm serve` with the openai SDK (and httpx for the task endpoints).

    genfarm serve examples/serve.yaml          # in one terminal
    python examples/client.py                  # in another (GENFARM_URL and GENFARM_API_KEY if you set keys)
"""

import os

import httpx
import openai

URL = os.environ.get("GENFARM_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("GENFARM_API_KEY", "none")  # any value works when the service has no keys
client = openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY)
model = client.models.list().data[0].id

answer = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Give me three facts about honey bees."}], max_tokens=120)
print(answer.choices[0].message.content, "\n", answer.usage, "\n")

print("streamed: ", end="")
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to ten."}],
                                            max_tokens=60, temperature=0, stream=True):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print("\n")

headers = {"Authorization": f"Bearer {KEY}"}
article = httpx.post(f"{URL}/v1/articles", headers=headers, timeout=300,
                     json={"topic": "the water cycle", "length": "about 150 words", "max_tokens": 300}).json()
print(article["title"] or "(no title line)", "\n", article["text"][:300], "...\n")

translation = httpx.post(f"{URL}/v1/translations", headers=headers, timeout=300,
                         json={"text": "The library opens at nine.", "target_language": "fr"}).json()
print(translation["target_language"], translation["text"])
