"""`GET /exports/{task_id}`: the file of a complete `export_analytics_data` job, streamed (docs/rest.md)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from api.deps import DbDep, ReadDep, RedisDep
from api.errors import error_responses
from api.rest import TaskId
from salesdash.config import get_settings
from worker import client
from worker.exportfiles import ExportMissingError, ExportPendingError, find_export

router = APIRouter()

_FILE_TYPES = ("application/x-ndjson", "text/csv", "application/vnd.apache.parquet")


@router.get(
    "/exports/{task_id}",
    response_class=FileResponse,
    responses={
        200: {"description": "the export file, as an attachment", "content": dict.fromkeys(_FILE_TYPES, {})},
        **error_responses(401, 403, 404, 409, 422),
    },
)
async def download_export(task_id: TaskId, redis: RedisDep, db: DbDep, _: ReadDep) -> FileResponse:
    try:
        export = await find_export(redis, db, task_id, get_settings().exports_dir)
    except (client.JobNotFoundError, ExportMissingError) as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except ExportPendingError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return FileResponse(export.path, media_type=export.media_type, filename=export.filename)
