"""The student's pieces: tokenizer, model factory, chat rendering with video tokens, freezing, DSA."""
