# The README's two commands: `make deploy` (the main job) and `make test`. Both set up first.
.PHONY: setup test deploy clean

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

deploy: setup
	.venv/bin/edgeslm deploy --out deploy-out --device host --device pixel-8 --device iphone-15-pro --allow-estimates

clean:
	rm -rf deploy-out .pytest_cache
