"""The multimodal roles: a processor that takes chat requests with images, encode workers
that turn images into embeddings, and the vLLM workers that generate from them.

- :mod:`.media` -- an image URL -> checked bytes (the processor fetches);
- :mod:`.prompt` -- chat messages -> prompt tokens with one marker per image;
- :mod:`.encoder` -- the encode worker's engine (vision tower) and its ``encode`` endpoint;
- :mod:`.tensors` -- embeddings between workers (inline or shared memory);
- :mod:`.inputs` -- a generating worker's side: the request's images, checked;
- :mod:`.chain` -- the processor's engine: the workers behind it;
- :mod:`.model` -- what the roles read from the model's directory.
"""
