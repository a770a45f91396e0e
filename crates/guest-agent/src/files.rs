//! File operations: chunked read/write at offsets, directory listing in pages, stat, mkdir,
//! remove, rename, exists. Every response is bounded (data by `MAX_CHUNK`, listings by
//! `MAX_DIR_ENTRIES`); errors carry the operation and the path.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use kiln_proto::{
    DirEntry, ErrorKind, FileKind, FileStat, Request, Response, MAX_CHUNK, MAX_DIR_ENTRIES,
};

/// A failed file operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FileError {
    op: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

impl FileError {
    fn response(&self) -> Response {
        Response::error(ErrorKind::from_io(&self.source), self.to_string())
    }
}

fn ctx<T>(op: &'static str, path: &str, r: std::io::Result<T>) -> Result<T, FileError> {
    r.map_err(|source| FileError {
        op,
        path: path.to_owned(),
        source,
    })
}

fn kind_of(ft: fs::FileType) -> FileKind {
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// Handle a file request (any other request is answered `InvalidRequest`).
pub fn handle(req: &Request) -> Response {
    let r = match req {
        Request::ReadFile { path, offset, len } => read(path, *offset, *len),
        Request::WriteFile {
            path,
            offset,
            data,
            create,
            truncate,
            mode,
        } => write(path, *offset, data, *create, *truncate, *mode),
        Request::ListDir { path, start } => list(path, *start),
        Request::Stat { path } => stat(path),
        Request::Mkdir {
            path,
            parents,
            mode,
        } => mkdir(path, *parents, *mode),
        Request::Remove { path, recursive } => remove(path, *recursive),
        Request::Rename { from, to } => {
            ctx("rename", from, fs::rename(from, to)).map(|()| Response::Ok)
        }
        Request::Exists { path } => exists(path),
        other => {
            return Response::error(
                ErrorKind::InvalidRequest,
                format!("{} is not a file operation", other.name()),
            )
        }
    };
    r.unwrap_or_else(|e| e.response())
}

fn read(path: &str, offset: u64, len: u64) -> Result<Response, FileError> {
    const OP: &str = "read";
    let f = ctx(OP, path, fs::File::open(path))?;
    let md = ctx(OP, path, f.metadata())?;
    if md.is_dir() {
        return ctx(
            OP,
            path,
            Err(std::io::Error::from(std::io::ErrorKind::IsADirectory)),
        );
    }
    let want = usize::try_from(len).unwrap_or(MAX_CHUNK).min(MAX_CHUNK);
    let mut buf = vec![0u8; want];
    let mut got = 0;
    let mut hit_end = false;
    while got < want {
        match f.read_at(&mut buf[got..], offset.saturating_add(got as u64)) {
            Ok(0) => {
                hit_end = true;
                break;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return ctx(OP, path, Err(e)),
        }
    }
    buf.truncate(got);
    let eof = hit_end || (md.is_file() && offset.saturating_add(got as u64) >= md.len());
    Ok(Response::Data { data: buf, eof })
}

fn write(
    path: &str,
    offset: u64,
    data: &[u8],
    create: bool,
    truncate: bool,
    mode: Option<u32>,
) -> Result<Response, FileError> {
    const OP: &str = "write";
    let f = ctx(
        OP,
        path,
        OpenOptions::new()
            .write(true)
            .create(create)
            .truncate(truncate)
            .mode(mode.unwrap_or(0o644))
            .open(path),
    )?;
    ctx(OP, path, f.write_all_at(data, offset))?;
    Ok(Response::Written {
        len: data.len() as u64,
    })
}

fn list(path: &str, start: u64) -> Result<Response, FileError> {
    const OP: &str = "list";
    let mut names: Vec<(String, std::path::PathBuf)> = Vec::new();
    for e in ctx(OP, path, fs::read_dir(path))? {
        let e = ctx(OP, path, e)?;
        names.push((e.file_name().to_string_lossy().into_owned(), e.path()));
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let start = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(names.len());
    let end = start.saturating_add(MAX_DIR_ENTRIES).min(names.len());
    let entries = names[start..end]
        .iter()
        .map(|(name, p)| {
            // An entry removed meanwhile is still listed, as `Other` of size 0.
            let (kind, size) = fs::symlink_metadata(p)
                .map(|m| (kind_of(m.file_type()), m.len()))
                .unwrap_or((FileKind::Other, 0));
            DirEntry {
                name: name.clone(),
                kind,
                size,
            }
        })
        .collect();
    Ok(Response::DirEntries {
        entries,
        more: end < names.len(),
    })
}

fn stat(path: &str) -> Result<Response, FileError> {
    let m = ctx("stat", path, fs::symlink_metadata(path))?;
    Ok(Response::Stat(FileStat {
        kind: kind_of(m.file_type()),
        size: m.len(),
        mode: m.mode() & 0o7777,
        mtime_ns: m
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec()),
    }))
}

fn mkdir(path: &str, parents: bool, mode: Option<u32>) -> Result<Response, FileError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(parents).mode(mode.unwrap_or(0o755));
    ctx("mkdir", path, b.create(path))?;
    Ok(Response::Ok)
}

fn remove(path: &str, recursive: bool) -> Result<Response, FileError> {
    const OP: &str = "remove";
    let m = ctx(OP, path, fs::symlink_metadata(path))?;
    let r = if m.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    ctx(OP, path, r)?;
    Ok(Response::Ok)
}

fn exists(path: &str) -> Result<Response, FileError> {
    match fs::symlink_metadata(Path::new(path)) {
        Ok(_) => Ok(Response::Bool(true)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(Response::Bool(false))
        }
        Err(e) => ctx("exists", path, Err(e)),
    }
}
