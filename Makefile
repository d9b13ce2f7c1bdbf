# AutoGen Fleet: the local stack, the services and the checks.
#
#   make up        install what is missing, start the stack and the services, seed the demo
#   make down      stop the services, then the stack (no process of ours is left)
#   make status    what runs; make logs: follow every log
#   make test      lint, format check, types and the test suite against the real stack
#   make bench     all benchmarks (or one: make bench NAME=baseline)
#   make lint / make fmt / make smoke / make install
#
# Data, pids and logs live in .local/ (git-ignored); deploy/local/README.md has the details.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

STACK    := deploy/local/stack
SERVICES := deploy/local/services
SEED     := deploy/local/seed
STACK_ENV := .local/stack.env
# Runs a command with the stack's addresses exported (written by `stack start`).
WITH_ENV := set -a && . $(STACK_ENV) && set +a &&
UV_RUN   := uv run --no-sync

ADMIN_EMAIL    ?= $(or $(AUTOGEN_ADMIN_EMAIL),admin@autogen.local)
ADMIN_PASSWORD ?= $(or $(AUTOGEN_ADMIN_PASSWORD),admin-dev-password)

.PHONY: help install up down status logs test lint fmt smoke bench

help: ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: ## system packages, uv, Kafka jars, Python env (only what is missing)
	@deploy/local/install

up: install ## start everything and print where it is
	@$(STACK) start
	@$(SERVICES) start
	@if [ -x $(SEED) ]; then $(WITH_ENV) $(SEED); fi
	@echo; $(WITH_ENV) printf '%s\n' \
	  "AutoGen Fleet is up." \
	  "  Console:      $$AUTOGEN_CONSOLE_URL" \
	  "  API:          $$AUTOGEN_API_BASE_URL" \
	  "  MQTT broker:  mqtt://$$AUTOGEN_MQTT_HOST:$$AUTOGEN_MQTT_PORT" \
	  "  Admin login:  $(ADMIN_EMAIL) / $(ADMIN_PASSWORD)" \
	  "  Logs:         make logs   Status: make status   Stop: make down"

down: ## stop the services, then the stack
	@$(SERVICES) stop
	@$(STACK) stop

status: ## what runs, and whether it answers
	@$(STACK) status || true; echo; $(SERVICES) status || true

logs: ## follow every log under .local/logs
	@tail -n 20 -F .local/logs/*.log

smoke: ## end-to-end checks of the running stack
	@$(STACK) smoke

lint: ## ruff and mypy
	$(UV_RUN) ruff check .
	$(UV_RUN) ruff format --check .
	$(UV_RUN) mypy

fmt: ## ruff fix and format
	$(UV_RUN) ruff check --fix .
	$(UV_RUN) ruff format .

# The suite runs against the real stack; .ci/run calls this on a fresh machine.
test: install ## lint, types and tests against the real stack
	@$(STACK) start
	@$(STACK) smoke
	@# System tests talk to the running services through nginx, as users do, with the demo
	@# fleet (accounts, devices, simulator) that the console tests drive.
	@$(SERVICES) start
	@$(WITH_ENV) $(SEED)
	$(UV_RUN) ruff check .
	$(UV_RUN) ruff format --check .
	$(UV_RUN) mypy
	@# pytest's exit code 5 (no tests collected) fails this target like any other failure.
	@$(WITH_ENV) rc=0 && $(UV_RUN) pytest || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; fi; \
	  exit $$rc

bench: install ## benchmarks against the real stack (NAME=<one> for one)
	@$(STACK) start
	@$(WITH_ENV) \
	  if [ -x bench/run ]; then bench/run $(NAME); \
	  elif [ -n "$(NAME)" ]; then $(UV_RUN) python bench/$(NAME).py; \
	  else for f in bench/*.py; do \
	    case $$(basename $$f) in __*) continue ;; esac; \
	    echo "== $$f"; $(UV_RUN) python $$f; \
	  done; fi
