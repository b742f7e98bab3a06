"""Load a SharedBasisLlama checkpoint with the stock transformers API and generate.

With hf_compress installed (`import hf_compress` registers the family) no remote code is needed; without it,
pass trust_remote_code=True and transformers runs the modeling files saved next to the weights.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "outputs/smollm2-basis-sharing-20"
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, fuse_bases=True)
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20, do_sample=False)[0]))
