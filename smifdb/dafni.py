"""DAFNI's workflow model, run locally: validating definitions and turning an instance into a DAG.

DAFNI runs each model step as a container with its parameters as environment variables,
inputs under /data/inputs and outputs under /data/outputs. Here a model version names what a
runner executes instead of an image: a shell ``command`` (parameters in its environment, run in
a private folder on the runner with ``inputs/`` and ``outputs/``) or a ``smif`` model run. Publisher and
visualisation steps become small Python jobs that record what their input steps produced.
"""

from __future__ import annotations

import math
import re
import shlex
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from smifdb import errors
from smifdb.pgtext import jsonb_problems, text_problem
from smifdb.spec import Dag, SpecError, parse
from smifdb.store.blobs import FileEntry

STEP_KINDS = {"model", "publisher", "visualisation"}
UNSUPPORTED_STEP_KINDS = {"loop", "parameter-iterator"}
PARAMETER_TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A step id names the step's folder under the instance's and becomes its job's key: a plain
# file name, never '.', '..' or a path (which would put the step's files elsewhere).
STEP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_PROBLEMS = 20
METADATA_FIELDS = ("display_name", "name", "summary")


class DefinitionError(errors.BadInput, ValueError):
    """A definition DAFNI would reject; ``problems`` lists every reason."""

    def __init__(self, what: str, problems: list[str]) -> None:
        super().__init__(f"invalid {what}: " + "; ".join(problems), problems=problems)
        self.what = what


def _metadata_problems(definition: Mapping, problems: list[str]) -> None:
    metadata = definition.get("metadata")
    if not isinstance(metadata, Mapping):
        problems.append("metadata: a mapping is required")
        return
    for name in METADATA_FIELDS:
        if not isinstance(metadata.get(name), str) or not metadata[name].strip():
            problems.append(f"metadata.{name}: a non-empty string is required")
    for name, value in metadata.items():
        if value is not None and not isinstance(value, str):
            problems.append(f"metadata.{name}: must be a string")


def _check(definition: Any, kind: str, what: str) -> Mapping:
    """A mapping of the right kind that jsonb can store (no NaN, NUL or date anywhere)."""
    if not isinstance(definition, Mapping):
        raise DefinitionError(
            what, [f"the definition must be a JSON object, not {type(definition).__name__}"]
        )
    if definition.get("kind", kind) != kind:
        raise DefinitionError(what, [f"kind: must be {kind!r}, got {definition.get('kind')!r}"])
    if problems := [f"{where}: {problem}" for where, problem in jsonb_problems(definition)]:
        raise DefinitionError(what, problems[:MAX_PROBLEMS])
    return definition


def message_problem(message: Any) -> str | None:
    """Why a version message cannot be stored, or None."""
    if not isinstance(message, str):
        return "version_message must be a string"
    if problem := text_problem(message):
        return f"version_message {problem}"
    return None


# -- model versions -------------------------------------------------------------------------


def validate_model(definition: Any) -> dict:
    """A model definition (DAFNI's, with ``spec.command`` or ``spec.smif`` instead of an image)."""
    definition = _check(definition, "M", "model definition")
    problems: list[str] = []
    _metadata_problems(definition, problems)
    spec = definition.get("spec")
    if not isinstance(spec, Mapping):
        raise DefinitionError("model definition", [*problems, "spec: a mapping is required"])
    command, smif = spec.get("command"), spec.get("smif")
    if (command is None) == (smif is None):
        problems.append(
            "spec: give exactly one of 'command' (a shell command) or 'smif' "
            "({project, model_run}): what a runner executes for this model"
        )
    elif command is not None and (not isinstance(command, str) or not command.strip()):
        problems.append("spec.command: must be a non-empty shell command")
    elif smif is not None and not (
        isinstance(smif, Mapping)
        and all(isinstance(smif.get(k), str) and smif[k] for k in ("project", "model_run"))
    ):
        problems.append("spec.smif: must be {project: <folder>, model_run: <name>}")
    timeout = spec.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < math.inf
    ):
        problems.append("spec.timeout: must be a positive number of seconds")
    inputs = spec.get("inputs", {"parameters": []})
    if inputs is not None and not isinstance(inputs, Mapping):
        problems.append("spec.inputs: must be a mapping")
        inputs = {}
    parameters = (inputs or {}).get("parameters", [])
    if not isinstance(parameters, list):
        problems.append("spec.inputs.parameters: must be a list")
        parameters = []
    dataslots = (inputs or {}).get("dataslots", [])
    if not isinstance(dataslots, list) or not all(isinstance(d, Mapping) for d in dataslots):
        problems.append("spec.inputs.dataslots: must be a list of mappings")
    outputs = spec.get("outputs")
    if outputs is not None and not (
        isinstance(outputs, Mapping) and isinstance(outputs.get("datasets", []), list)
    ):
        problems.append("spec.outputs: must be a mapping with a list of datasets")
    seen: set[str] = set()
    for i, parameter in enumerate(parameters):
        where = f"spec.inputs.parameters[{i}]"
        if not isinstance(parameter, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        name = parameter.get("name")
        if not isinstance(name, str) or not ENV_NAME.match(name):
            problems.append(f"{where}.name: must be an environment variable name like MY_PARAM")
            continue
        if name in seen:
            problems.append(f"{where}.name: {name!r} is given twice")
        seen.add(name)
        kind = parameter.get("type")
        if not isinstance(kind, str) or kind not in PARAMETER_TYPES:
            problems.append(f"{where}.type: must be one of {', '.join(PARAMETER_TYPES)}")
        elif "default" in parameter and not PARAMETER_TYPES[kind](parameter["default"]):
            problems.append(f"{where}.default: must be of type {kind}")
    if problems:
        raise DefinitionError("model definition", problems)
    return {**definition, "kind": "M"}


def model_parameters(model: Mapping) -> dict[str, Mapping]:
    inputs = model["spec"].get("inputs") or {}
    return {p["name"]: p for p in inputs.get("parameters", [])}


# -- workflow versions and parameter sets ---------------------------------------------------


def validate_workflow(definition: Any, model_exists: Callable[[str], bool]) -> dict:
    """Every problem at once: step kinds, dependencies, cycles, unknown model versions."""
    definition = _check(definition, "W", "workflow definition")
    problems: list[str] = []
    _metadata_problems(definition, problems)
    spec = definition.get("spec")
    steps = spec.get("steps") if isinstance(spec, Mapping) else None
    if not isinstance(steps, Mapping) or not steps:
        raise DefinitionError(
            "workflow definition", [*problems, "spec.steps: a non-empty mapping is required"]
        )
    for step_id, step in steps.items():
        where = f"spec.steps.{step_id}"
        if not isinstance(step_id, str) or not STEP_ID.match(step_id):
            problems.append(
                f"spec.steps: the step id {step_id!r} must be 1 to 128 letters, digits, '_', "
                "'.' or '-', starting with a letter or digit (it names the step's folder)"
            )
            continue
        if not isinstance(step, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        kind = step.get("kind")
        if not isinstance(kind, str):
            problems.append(f"{where}.kind: must be one of {', '.join(sorted(STEP_KINDS))}")
        elif kind in UNSUPPORTED_STEP_KINDS:
            problems.append(f"{where}.kind: {kind!r} steps are not supported by smifdb's shim")
        elif kind not in STEP_KINDS:
            problems.append(f"{where}.kind: must be one of {', '.join(sorted(STEP_KINDS))}")
        if not isinstance(step.get("name"), str) or not step["name"]:
            problems.append(f"{where}.name: a non-empty string is required")
        for field in ("dependencies", "inputs"):
            value = step.get(field, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{where}.{field}: must be a list of step ids")
            elif unknown := [v for v in value if v not in steps]:
                problems.append(f"{where}.{field}: unknown step(s) {', '.join(unknown)}")
        if kind == "model":
            version = step.get("model_version")
            if not isinstance(version, str) or not _is_uuid(version):
                problems.append(f"{where}.model_version: a model version id is required")
            elif not model_exists(version):
                problems.append(f"{where}.model_version: no model version {version}")
    if not problems:  # the DAG checks (cycles) reuse smifdb's own spec validation
        try:
            parse({"jobs": [_placeholder(k, s) for k, s in steps.items()]})
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DefinitionError("workflow definition", problems)
    return {**definition, "kind": "W"}


def _placeholder(step_id: str, step: Mapping) -> dict:
    return {"key": step_id, "python": "smifdb.examples:noop", "after": _needs(step)}


def _needs(step: Mapping) -> list[str]:
    """A step waits for its dependencies and for the steps whose outputs it takes."""
    return sorted({*step.get("dependencies", []), *step.get("inputs", [])})


def validate_parameter_set(
    definition: Any, workflow: Mapping | None, models: Mapping[str, Mapping]
) -> dict:
    """A parameter set against its workflow version and that version's model parameters."""
    definition = _check(definition, "P", "parameter set")
    problems: list[str] = []
    metadata = definition.get("metadata")
    if not isinstance(metadata, Mapping):
        raise DefinitionError("parameter set", ["metadata: a mapping is required"])
    for name in ("display_name", "name", "workflow_version"):
        if not isinstance(metadata.get(name), str) or not metadata[name].strip():
            problems.append(f"metadata.{name}: a non-empty string is required")
    if workflow is None:
        if not problems:
            problems.append(
                f"metadata.workflow_version: no workflow {metadata['workflow_version']}"
            )
        raise DefinitionError("parameter set", problems)
    steps = workflow["spec"]["steps"]
    spec = definition.get("spec", {})
    if not isinstance(spec, Mapping):
        raise DefinitionError("parameter set", [*problems, "spec: must be a mapping"])
    given: dict[str, set[str]] = {}  # step id -> the parameters given a value
    for step_id, values in spec.items():
        where = f"spec.{step_id}"
        step = steps.get(step_id)
        if step is None:
            problems.append(f"{where}: the workflow has no step {step_id!r}")
            continue
        if not isinstance(values, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        parameters = values.get("parameters", [])
        if not isinstance(parameters, list):
            problems.append(f"{where}.parameters: must be a list")
            continue
        if parameters and step["kind"] != "model":
            problems.append(f"{where}.parameters: a {step['kind']} step takes no parameters")
            continue
        known = model_parameters(models[step["model_version"]]) if parameters else {}
        names = given.setdefault(step_id, set())
        for i, parameter in enumerate(parameters):
            at = f"{where}.parameters[{i}]"
            if not isinstance(parameter, Mapping) or not isinstance(parameter.get("name"), str):
                problems.append(f"{at}: must be {{name, value}}")
            elif parameter["name"] in names:
                problems.append(f"{at}: {parameter['name']!r} is given twice")
            elif parameter["name"] not in known:
                problems.append(
                    f"{at}: the model of step {step_id!r} has no parameter "
                    f"{parameter['name']!r} (it has: {', '.join(known) or 'none'})"
                )
            elif "value" not in parameter:
                problems.append(f"{at}: a value is required")
            elif not PARAMETER_TYPES[known[parameter["name"]]["type"]](parameter["value"]):
                problems.append(f"{at}.value: must be of type {known[parameter['name']]['type']}")
            if isinstance(parameter, Mapping) and isinstance(parameter.get("name"), str):
                names.add(parameter["name"])
        problems.extend(_dataslot_problems(values.get("dataslots", []), where))
    for step_id, step in steps.items():
        if step["kind"] != "model":
            continue
        for name, parameter in model_parameters(models[step["model_version"]]).items():
            missing = name not in given.get(step_id, ())
            if parameter.get("required") and "default" not in parameter and missing:
                problems.append(f"spec.{step_id}: required parameter {name!r} has no value")
    if problems:
        raise DefinitionError("parameter set", problems)
    return {**definition, "kind": "P"}


def _is_uuid(value: str) -> bool:
    """A UUID as the database prints it: "{…}", "urn:uuid:…" or upper case would find the
    model at upload and miss it (as 'deleted') whenever it is looked up by its text."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


# -- instances ------------------------------------------------------------------------------


def _env_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def instance_dag(
    instance_id: uuid.UUID,
    workflow: Mapping,
    parameter_set: Mapping,
    models: Mapping[str, Mapping],
    dataslot_steps: frozenset[str] = frozenset(),
) -> dict:
    """The smifdb DAG spec of one execution: one job per step, keyed by step id.

    A model step is a command job in a private folder on whichever runner takes it: its input
    steps' stored outputs are materialised under ``<step id>/outputs/`` and linked as
    ``inputs/<step id>``; what it leaves in ``outputs/`` is stored as its outputs. The steps of
    ``dataslot_steps`` get their dataslots' files (the workflow's files, see
    ``dataslot_files``) copied into place first. Nothing passes through a folder the runners
    share."""
    name = workflow["metadata"]["display_name"]
    jobs = []
    for step_id, step in workflow["spec"]["steps"].items():
        inputs = step.get("inputs", [])
        _check_step_id(step_id)
        for source in inputs:
            _check_step_id(source, as_input=True)
        job: dict[str, Any] = {"key": step_id, "after": _needs(step), "model": step["name"]}
        if step["kind"] == "model":
            model = models[step["model_version"]]
            values = {
                p["name"]: p["value"]
                for p in parameter_set.get("spec", {}).get(step_id, {}).get("parameters", [])
            }
            env = {
                pname: _env_value(values.get(pname, p.get("default", "")))
                for pname, p in model_parameters(model).items()
            }
            env |= {"DAFNI_INSTANCE_ID": str(instance_id), "DAFNI_STEP_ID": step_id}
            slots = step_id in dataslot_steps
            job |= {"command": _step_command(model["spec"], inputs, step_id if slots else None)}
            job["env"] = env
            job |= {"inputs": inputs, "outputs": [STEP_OUTPUTS]}
            job["operation"] = "simulate"
            if model["spec"].get("timeout"):
                job["timeout"] = model["spec"]["timeout"]
        else:
            job |= {
                "python": "smifdb.dafni:publish",
                "args": {"step_id": step_id, "inputs": inputs},
                "operation": step["kind"],
            }
        jobs.append(job)
    return {"name": f"dafni: {name}", "jobs": jobs}


# -- dataslots ------------------------------------------------------------------------------

# Where a workflow's files put each step's dataslot files: a name no step id can take (a step
# id starts with a letter or digit), so never an input step's folder.
DATASLOTS = ".dataslots"
DEFAULT_DATASLOT_PATH = "inputs/"


def _dataslot_path(value: Any) -> str | None:
    """A dataslot path, normalised ('inputs/data/' is 'inputs/data'); None if it is not a
    relative path inside ``inputs/``, where DAFNI puts a step's data."""
    if not isinstance(value, str) or "\0" in value or value.startswith("/"):
        return None
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts or parts[0] != "inputs" or ".." in parts:
        return None
    return "/".join(parts)


def _dataslot_problems(dataslots: Any, where: str) -> list[str]:
    if not isinstance(dataslots, list):
        return [f"{where}.dataslots: must be a list"]
    problems = []
    for i, slot in enumerate(dataslots):
        at = f"{where}.dataslots[{i}]"
        if not isinstance(slot, Mapping):
            problems.append(f"{at}: must be {{name, path, datasets}}")
            continue
        if "path" in slot and _dataslot_path(slot["path"]) is None:
            problems.append(f"{at}.path: must be a relative path under inputs/, like inputs/data/")
        datasets = slot.get("datasets", [])
        if not isinstance(datasets, list) or not all(
            isinstance(d, str) and _is_uuid(d) for d in datasets
        ):
            problems.append(f"{at}.datasets: must be a list of dataset version ids")
    return problems


def dataslots(
    workflow: Mapping, parameter_set: Mapping, models: Mapping[str, Mapping]
) -> dict[str, list[tuple[str, list[uuid.UUID]]]]:
    """What each model step's dataslots hold: step id -> [(path under its folder, dataset
    version ids)]. A parameter set's dataslot fills the model's slot of its name (its path
    if it gives none); a model's slot it leaves out keeps its ``default`` datasets."""
    out: dict[str, list[tuple[str, list[uuid.UUID]]]] = {}
    for step_id, step in workflow["spec"]["steps"].items():
        if step["kind"] != "model":
            continue
        inputs = models[step["model_version"]]["spec"].get("inputs") or {}
        slots = {s.get("name"): s for s in inputs.get("dataslots", []) if isinstance(s, Mapping)}
        given = parameter_set.get("spec", {}).get(step_id, {}).get("dataslots", [])
        chosen: list[tuple[Any, list]] = []
        named = set()
        for slot in given:
            named.add(slot.get("name"))
            path = slot.get("path") or slots.get(slot.get("name"), {}).get("path")
            chosen.append((path or DEFAULT_DATASLOT_PATH, slot.get("datasets", [])))
        for name, slot in slots.items():
            default = slot.get("default")
            if name not in named and isinstance(default, list) and default:
                chosen.append((slot.get("path") or DEFAULT_DATASLOT_PATH, default))
        filled = []
        for path, versions in chosen:
            normal = _dataslot_path(path)
            if normal is None:
                raise SpecError([f"step {step_id!r}: dataslot path {path!r} is not under inputs/"])
            try:
                ids = [uuid.UUID(str(v)) for v in versions]
            except ValueError:
                raise SpecError(
                    [
                        f"step {step_id!r}: dataslot {path!r} names a dataset version that is not an id"
                    ]
                ) from None
            if ids:
                filled.append((normal, ids))
        if filled:
            out[step_id] = filled
    return out


def dataslot_files(
    slots: Mapping[str, list[tuple[str, list[uuid.UUID]]]],
    files: Mapping[uuid.UUID, list[FileEntry]],
) -> list[FileEntry]:
    """The workflow's files that put each step's dataslot files in place: the files of each
    dataset version at ``.dataslots/<step id>/<path>/<file>``. Two files at one path (two
    datasets in one slot with a file of the same name) is a SpecError naming both."""
    placed: dict[str, tuple[FileEntry, uuid.UUID]] = {}
    problems = []
    for step_id, filled in slots.items():
        for path, versions in filled:
            for version in versions:
                for entry in files[version]:
                    at = f"{DATASLOTS}/{step_id}/{path}/{entry.path}"
                    if at in placed and placed[at][0].sha256 != entry.sha256:
                        problems.append(
                            f"step {step_id!r}: {path}/{entry.path} is in dataset versions "
                            f"{placed[at][1]} and {version}"
                        )
                    placed[at] = (FileEntry(at, entry.sha256, entry.size, entry.mode), version)
    if problems:
        raise SpecError(problems)
    return [entry for entry, _ in placed.values()]


def with_files(dag: Dag, keys: frozenset[str]) -> Dag:
    """The DAG with the jobs ``keys`` given the workflow's files in their folders (the spec's
    ``files:`` gives them to every command job; only steps with dataslots need them)."""
    jobs = [
        job._replace(payload={**job.payload, "files": True}) if job.key in keys else job
        for job in dag.jobs
    ]
    return replace(dag, jobs=jobs)


# Everything a model step leaves in outputs/ (a folder stands for the files under it).
STEP_OUTPUTS = "outputs"
# The step's own folders: an input step of these names would land among them.
STEP_FOLDERS = ("inputs", "outputs")


def _check_step_id(step_id: str, *, as_input: bool = False) -> None:
    """A step id becomes a folder name in the job's folder: a plain name, and an input
    step's never one of the step's own folders."""
    if not STEP_ID.match(step_id):
        raise SpecError([f"step id {step_id!r} is not a safe folder name"])
    if as_input and step_id in STEP_FOLDERS:
        raise SpecError(
            [f"step id {step_id!r} cannot be another step's input: it names a step's own folder"]
        )


def _step_command(spec: Mapping, inputs: list[str], dataslots_of: str | None = None) -> str:
    """Make the step's folders, put its dataslots' files in place and link its input steps'
    outputs, then run the model.

    Runs in the job's private folder, where each input step's outputs are under
    ``<step id>/outputs/`` (absent if it left none), and the dataslot files of step
    ``dataslots_of`` under ``.dataslots/<step id>/`` (copied, so that a model that changes its
    inputs never touches the runner's cache)."""
    q = shlex.quote
    lines = ["mkdir -p inputs outputs"]
    if dataslots_of is not None:
        slots = q(f"{DATASLOTS}/{dataslots_of}")
        lines.append(f"if [ -d {slots} ]; then cp -R {slots}/. .; fi")
    for source in inputs:
        lines.append(f"mkdir -p {q(source + '/outputs')}")
        lines.append(f"ln -sfn {q('../' + source + '/outputs')} {q('inputs/' + source)}")
    lines.append('export INPUTS_DIR="$PWD/inputs" OUTPUTS_DIR="$PWD/outputs"')
    if "smif" in spec:
        smif = spec["smif"]
        lines.append(f"exec smif run -d {q(smif['project'])} {q(smif['model_run'])}")
    else:
        lines.append(spec["command"])
    return "\n".join(lines)


def publish(step_id: str, inputs: list[str], instance_dir: str | None = None) -> dict:
    """A publisher step: the identifiers of the dataset it would publish.

    Its files are its input steps' stored outputs, listed when the instance is read (they
    are rows, not a folder); ``instance_dir`` is accepted, and ignored, from jobs queued by
    an older smifdb."""
    return {k: str(uuid.uuid4()) for k in ("dataset_id", "metadata_id", "version_id")}


# -- dataset metadata (DAFNI's NID) ---------------------------------------------------------

DATASET_SUBJECTS = (
    "Biota",
    "Boundaries",
    "Climate / Meteorology / Atmosphere",
    "Economy",
    "Elevation",
    "Environment",
    "Farming",
    "Geoscientific Information",
    "Health",
    "Imagery / Base Maps / Earth Cover",
    "Inland Waters",
    "Intelligence / Military",
    "Locations",
    "Ocean",
    "Planning / Cadastre",
    "Society",
    "Structure",
    "Transportation",
    "Utilities / Communication",
)
_DATES = (
    ("dct:created",),
    ("embargoEndDate",),
    ("dct:PeriodOfTime", "time:hasBeginning"),
    ("dct:PeriodOfTime", "time:hasEnd"),
)


def parse_date(value: Any) -> datetime | None:
    """An ISO 8601 date or date-time as DAFNI's metadata holds them; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text(metadata: Mapping, key: str) -> bool:
    return isinstance(metadata.get(key), str) and bool(metadata[key].strip())


def validate_dataset_metadata(metadata: Any) -> dict:
    """Dataset metadata as DAFNI's NID takes it (what ``dafni create dataset-metadata``
    writes): every problem at once, or the metadata."""
    what = "dataset metadata"
    if not isinstance(metadata, Mapping):
        raise DefinitionError(what, ["metadata: a JSON object is required"])
    if problems := [f"{where}: {problem}" for where, problem in jsonb_problems(metadata)]:
        raise DefinitionError(what, problems[:MAX_PROBLEMS])
    for key in ("dct:title", "dct:description", "dct:language"):
        if not _text(metadata, key):
            problems.append(f"{key}: a non-empty string is required")
    if metadata.get("dct:subject") not in DATASET_SUBJECTS:
        problems.append(f"dct:subject: must be one of {', '.join(DATASET_SUBJECTS)}")
    for key, required in (("dcat:keyword", True), ("dcat:theme", False), ("dct:identifier", False)):
        value = metadata.get(key, None if required else [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            problems.append(f"{key}: must be a list of non-empty strings")
        elif required and not value:
            problems.append(f"{key}: at least one is required")
    creators = metadata.get("dct:creator")
    if not isinstance(creators, list) or not creators:
        problems.append("dct:creator: at least one creator (organisation or person) is required")
    else:
        for i, creator in enumerate(creators):
            if not isinstance(creator, Mapping) or not _text(creator, "foaf:name"):
                problems.append(f"dct:creator[{i}]: a foaf:name is required")
            elif not isinstance(creator.get("@type"), str):
                problems.append(f"dct:creator[{i}]: an @type is required")
    contact = metadata.get("dcat:contactPoint")
    if not isinstance(contact, Mapping) or not _text(contact, "vcard:fn"):
        problems.append("dcat:contactPoint: a vcard:fn (contact name) is required")
    elif "@" not in str(contact.get("vcard:hasEmail") or ""):
        problems.append("dcat:contactPoint: a vcard:hasEmail (email address) is required")
    license_ = metadata.get("dct:license")
    if not isinstance(license_, Mapping) or not _text(license_, "@id"):
        problems.append("dct:license: an @id (the licence's URL) is required")
    for key in ("dct:spatial", "dct:publisher", "dct:conformsTo", "dct:PeriodOfTime", "project"):
        if metadata.get(key) is not None and not isinstance(metadata[key], Mapping):
            problems.append(f"{key}: must be an object")
    for path in _DATES:
        value: Any = metadata
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None and parse_date(value) is None:
            problems.append(f"{'.'.join(path)}: must be an ISO 8601 date, like 2020-01-31")
    period = metadata.get("dct:PeriodOfTime")
    if isinstance(period, Mapping):
        begin, end = (
            parse_date(period.get("time:hasBeginning")),
            parse_date(period.get("time:hasEnd")),
        )
        if begin and end and begin > end:
            problems.append("dct:PeriodOfTime: time:hasBeginning is after time:hasEnd")
    if metadata.get("dafni_version_note") is not None and not isinstance(
        metadata["dafni_version_note"], str
    ):
        problems.append("dafni_version_note: must be a string")
    if problems:
        raise DefinitionError(what, problems)
    return dict(metadata)
