//! Where content and records live: the blob store on disk (`fs`), the sled
//! database (`db`) and the file system's free space (`disk`).

pub mod db;
pub mod disk;
pub mod fs;
