// The console's one script: uploads a package from the Updates page with a progress bar.
// The package goes as the request body (its length known up front, as the import needs),
// with the session's CSRF token in a header; the answer is the Updates page with the outcome.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  if (!form) return;
  form.hidden = false;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const file = document.getElementById("upload-file").files[0];
    if (!file) return;
    const bar = document.getElementById("upload-progress");
    const msg = document.getElementById("upload-msg");
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/updates/upload?name=" + encodeURIComponent(file.name));
    xhr.setRequestHeader("x-csrf-token", form.dataset.csrf);
    xhr.setRequestHeader("content-type", "application/octet-stream");
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      bar.max = e.total;
      bar.value = e.loaded;
      msg.textContent = Math.floor((100 * e.loaded) / e.total) + " % of " + e.total + " bytes";
    };
    xhr.onload = () => {
      if (xhr.status === 200) {
        window.location.assign(xhr.responseURL);
        return;
      }
      const page = new DOMParser().parseFromString(xhr.responseText, "text/html");
      msg.textContent = "Refused: " + (page.querySelector("p") || page.body).textContent;
    };
    xhr.onerror = () => {
      msg.textContent = "The upload failed: the connection broke.";
    };
    bar.hidden = false;
    bar.value = 0;
    msg.textContent = "Uploading " + file.name;
    xhr.send(file);
  });
});
