# Thin wrappers over the scripts (see README.md).
FUZZTIME ?= 120

.PHONY: test demo fuzz

test:
	./scripts/test.sh

demo:
	./scripts/demo.sh

# Every fuzz target for FUZZTIME seconds each (CI: ./scripts/fuzz.sh --brief).
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

